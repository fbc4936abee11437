//! The PCR layout: which PCR carries what, for every image and platform of this code base.
//! Images compute expected values with these indices, nodes extend and quote them, the
//! provider reports them; nobody else writes a PCR index as a literal.
//!
//! | PCR | QEMU image (real measured boot) | local platform (emulated extends) |
//! |-----|---------------------------------|-----------------------------------|
//! | 0-3, 5-7 | firmware, its configuration, boot variables | not extended |
//! | 4 | the boot application: the kernel's PE image | the bootstrapper binary |
//! | 8 | a boot loader's command line: nothing measures it, must stay zero | not extended |
//! | 9 | the kernel command line and initrd (EFI stub) | the image manifest |
//! | 15 | the cluster ID, extended once at init or join | same |

use std::ops::RangeInclusive;

/// Firmware code, configuration and boot variables: their values depend on the firmware
/// build (and for PCR 0 on the guest's RAM), not on the image.
pub const FIRMWARE: [u32; 7] = [0, 1, 2, 3, 5, 6, 7];

/// The boot application OVMF measures by its PE image hash (the kernel); the local platform
/// extends it with the bootstrapper binary, which plays that part there.
pub const BOOT_APP: u32 = 4;

/// Where a boot loader (GRUB) would measure the command line. This boot chain has no boot
/// loader, so it must stay zero: a non-zero value means something unexpected ran.
pub const BOOT_LOADER_CMDLINE: u32 = 8;

/// The kernel's EFI stub measures the command line and the initrd here; the local platform
/// extends it with the image manifest (which names every file the node runs).
pub const KERNEL_CONFIG: u32 = 9;

/// Binds a node to its cluster: extended exactly once with SHA-256(cluster ID) at init or
/// join, zero before.
pub const CLUSTER_ID: u32 = 15;

/// Every quote covers these PCRs (each variant's issuer quotes them all, so a verifier may
/// enforce any of them).
pub const QUOTED: RangeInclusive<u32> = 0..=15;

/// The PCRs an image's policy enforces on every platform: the boot application, the kernel
/// configuration and the cluster ID.
pub const ENFORCED: [u32; 3] = [BOOT_APP, KERNEL_CONFIG, CLUSTER_ID];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_indices_are_distinct_and_quoted() {
        let mut all: Vec<u32> = FIRMWARE.to_vec();
        all.extend([BOOT_APP, BOOT_LOADER_CMDLINE, KERNEL_CONFIG, CLUSTER_ID]);
        let mut dedup = all.clone();
        dedup.sort_unstable();
        dedup.dedup();
        assert_eq!(dedup.len(), all.len(), "two roles share a PCR: {all:?}");
        for pcr in all.iter().chain(ENFORCED.iter()) {
            assert!(
                QUOTED.contains(pcr),
                "PCR {pcr} has a role but is not quoted"
            );
        }
    }
}
