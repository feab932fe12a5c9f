//! Guest physical memory map for x86_64 direct boot.
//!
//! The low addresses follow the Linux boot protocol and Firecracker's layout:
//! everything the VMM writes before the first instruction sits below 1 MiB,
//! the kernel loads at its ELF physical addresses, and MMIO devices live in a
//! gap below 4 GiB that RAM never covers.

/// GDT written by the VMM (null, code, data, TSS).
pub const GDT_ADDR: u64 = 0x500;
/// IDT (empty: the kernel installs its own before enabling interrupts).
pub const IDT_ADDR: u64 = 0x520;
/// `boot_params` ("zero page") handed to the kernel in RSI.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables: PML4, PDPT, and one PD of 2 MiB pages.
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
/// The RNG seed passed as `setup_data` so the guest CRNG is ready at once.
pub const SETUP_DATA_ADDR: u64 = 0xc000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
pub const CMDLINE_MAX_LEN: usize = 4096;
/// Start of the EBDA: RAM below it is usable, 0x9fc00..1 MiB is reserved.
pub const EBDA_START: u64 = 0x9fc00;
/// High memory starts at 1 MiB; the kernel must load above it.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the MMIO gap below 4 GiB: RAM above it is placed past 4 GiB.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Each virtio-mmio device gets one 4 KiB window, in order from the gap start.
pub const MMIO_DEVICE_SIZE: u64 = 0x1000;
/// The first legacy IRQ line handed to virtio-mmio devices (4 is the serial port).
pub const FIRST_DEVICE_IRQ: u32 = 5;
/// Legacy IRQ lines end at 15; without an MP table the guest routes through the PIC.
pub const LAST_DEVICE_IRQ: u32 = 15;
/// The TSS region KVM needs on Intel hosts (three pages below the BIOS area).
pub const KVM_TSS_ADDR: usize = 0xfffb_d000;
/// Serial port (COM1) and its IRQ.
pub const SERIAL_PORT_BASE: u16 = 0x3f8;
pub const SERIAL_PORT_LEN: u16 = 8;
pub const SERIAL_IRQ: u32 = 4;
/// i8042 command port: the guest resets the machine by writing 0xfe here.
pub const I8042_COMMAND_PORT: u16 = 0x64;

/// The RAM regions for `mem_size` bytes, split around the MMIO gap.
pub fn ram_regions(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_size - MMIO_GAP_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_region() {
        assert_eq!(ram_regions(128 << 20), vec![(0, 128 << 20)]);
    }

    #[test]
    fn large_memory_skips_the_mmio_gap() {
        let regions = ram_regions(4 << 30);
        assert_eq!(regions[0], (0, MMIO_GAP_START));
        assert_eq!(regions[1], (MMIO_GAP_END, (4 << 30) - MMIO_GAP_START));
    }
}
