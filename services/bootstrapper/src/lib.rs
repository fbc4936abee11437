//! The bootstrapper: the node daemon that initializes or joins a cluster.

pub mod kubernetes;
pub mod statedisk;
