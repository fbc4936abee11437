//! Variant `qemu-vtpm` (placeholder: being written).
