//! The bootstrapper: the node daemon that initializes or joins a cluster.

pub mod cluster_validator;
pub mod context;
pub mod controlplane;
pub mod daemons;
pub mod disk_key;
pub mod etcd;
pub mod init;
pub mod kubernetes;
pub mod node;
pub mod recover;
pub mod state;
pub mod statedisk;
pub mod supervisor;
pub mod tpm_mux;
pub mod vm;
