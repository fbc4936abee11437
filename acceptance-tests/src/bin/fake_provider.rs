//! `terraform-provider-constellation-fake`: the provider with the FAKE cluster backend (starts
//! no nodes; one JSON record per cluster in `$CONSTELLATION_PROVIDER_FAKE_DIR`), for the
//! acceptance tests of the `constellation_cluster` schema, plan rules, drift and import. Lives
//! in the test harness so the real provider binary has no switch that selects a fake.

use std::sync::Arc;

use terraform_provider_constellation::cluster::fake::FakeClusterBackend;

fn main() -> std::process::ExitCode {
    terraform_provider_constellation::run(|| Arc::new(FakeClusterBackend::from_env()))
}
