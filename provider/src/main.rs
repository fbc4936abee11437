//! `terraform-provider-constellation`: started by Terraform, never by hand. Always the real
//! (local) cluster backend: the fake one exists only in the acceptance tests' own binary.

use terraform_provider_constellation::cluster::local_backend::local_backend;

fn main() -> std::process::ExitCode {
    terraform_provider_constellation::run(local_backend)
}
