//! The Intel MultiProcessor table (MP spec 1.4): how a guest without ACPI learns
//! of its CPUs, its IOAPIC and how ISA interrupts reach it. Without one, Linux
//! scans the whole BIOS area for it (seconds of emulated work on PVM hosts),
//! routes every interrupt through the 8259 PIC and never starts the local APIC
//! timer. Written where Linux looks first, at the start of the EBDA.
//!
//! Hand-written: no maintained crate provides it (Firecracker and Cloud
//! Hypervisor keep theirs inside their VMMs).

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::EBDA_START;

const MPTABLE_START: u64 = EBDA_START;
/// The reserved area the table must fit in (EBDA start to 640 KiB).
const MPTABLE_MAX_LEN: usize = 0xa0000 - EBDA_START as usize;
const SPEC_REV_1_4: u8 = 4;
const APIC_DEFAULT_BASE: u32 = 0xfee0_0000;
const IOAPIC_DEFAULT_BASE: u32 = 0xfec0_0000;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// The IOAPIC's input pins, each fed by the ISA IRQ of the same number.
const IOAPIC_PINS: u8 = 24;
const ISA_BUS_ID: u8 = 0;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
/// CPUID family 6: what the table's CPU signature claims; Linux ignores it.
const CPU_SIGNATURE: u32 = 0x600;
/// FPU and APIC present.
const CPU_FEATURES: u32 = 0x201;

#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    #[error("an MP table for {0} vCPUs does not fit below 640 KiB")]
    TooManyCpus(u8),
    #[error("cannot write the MP table into guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// Writes the floating pointer and the configuration table for `cpus` vCPUs.
pub fn write_mptable(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), MpTableError> {
    let table = build(cpus);
    if table.len() > MPTABLE_MAX_LEN {
        return Err(MpTableError::TooManyCpus(cpus));
    }
    mem.write_slice(&table, GuestAddress(MPTABLE_START))?;
    Ok(())
}

/// The floating pointer (16 bytes) followed by the configuration table.
fn build(cpus: u8) -> Vec<u8> {
    let ioapic_id = cpus; // after the local APIC IDs 0..cpus
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_DEFAULT_BASE.to_le_bytes());
    count += 1;
    for irq in 0..IOAPIC_PINS {
        // Flags 0: polarity and trigger mode as the bus defines them (ISA: edge, high).
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_TYPE_INT, 0, 0, ISA_BUS_ID, irq]);
        entries.extend_from_slice(&[ioapic_id, irq]);
        count += 1;
    }
    // LINT0 of every local APIC takes the PIC's output, LINT1 is NMI.
    entries.extend_from_slice(&[
        ENTRY_LOCAL_INTERRUPT,
        INT_TYPE_EXTINT,
        0,
        0,
        ISA_BUS_ID,
        0,
        0xff,
        0,
    ]);
    entries.extend_from_slice(&[
        ENTRY_LOCAL_INTERRUPT,
        INT_TYPE_NMI,
        0,
        0,
        ISA_BUS_ID,
        0,
        0xff,
        1,
    ]);
    count += 2;

    const HEADER_LEN: usize = 44;
    let config_addr = MPTABLE_START as u32 + 16;
    let mut config = Vec::with_capacity(HEADER_LEN + entries.len());
    config.extend_from_slice(b"PCMP");
    config.extend_from_slice(&((HEADER_LEN + entries.len()) as u16).to_le_bytes());
    config.push(SPEC_REV_1_4);
    config.push(0); // checksum, below
    config.extend_from_slice(b"HUSK    "); // OEM ID
    config.extend_from_slice(b"HUSK-VMM    "); // product ID
    config.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    config.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    config.extend_from_slice(&count.to_le_bytes());
    config.extend_from_slice(&APIC_DEFAULT_BASE.to_le_bytes());
    config.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    config.extend_from_slice(&[0, 0]); // extended checksum, reserved
    config.extend_from_slice(&entries);
    config[7] = checksum(&config);

    let mut floating = Vec::with_capacity(16);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&config_addr.to_le_bytes());
    floating.extend_from_slice(&[1, SPEC_REV_1_4, 0]); // length in 16-byte units, rev, checksum
    floating.extend_from_slice(&[0; 5]); // feature bytes: a configuration table is present
    floating[10] = checksum(&floating);

    floating.extend_from_slice(&config);
    floating
}

/// The byte that makes the structure's bytes sum to zero.
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn structures_checksum_to_zero_and_point_at_each_other() {
        let table = build(1);
        assert_eq!(&table[..4], b"_MP_");
        assert_eq!(sum(&table[..16]), 0);
        let config_addr = u32::from_le_bytes(table[4..8].try_into().unwrap());
        assert_eq!(u64::from(config_addr), MPTABLE_START + 16);
        let config = &table[16..];
        assert_eq!(&config[..4], b"PCMP");
        let len = usize::from(u16::from_le_bytes([config[4], config[5]]));
        assert_eq!(len, config.len());
        assert_eq!(sum(config), 0);
    }

    #[test]
    fn entries_list_cpus_bus_ioapic_and_interrupts() {
        let table = build(2);
        let config = &table[16..];
        let count = u16::from_le_bytes([config[34], config[35]]);
        assert_eq!(count, 2 + 1 + 1 + u16::from(IOAPIC_PINS) + 2);
        // The first CPU is the bootstrap processor; the second is not.
        assert_eq!(
            &config[44..48],
            &[
                ENTRY_PROCESSOR,
                0,
                APIC_VERSION,
                CPU_ENABLED | CPU_BOOTSTRAP
            ]
        );
        assert_eq!(
            &config[64..68],
            &[ENTRY_PROCESSOR, 1, APIC_VERSION, CPU_ENABLED]
        );
        // The IOAPIC takes the ID after the CPUs'.
        assert_eq!(&config[92..96], &[ENTRY_IOAPIC, 2, IOAPIC_VERSION, 1]);
    }

    #[test]
    fn too_many_cpus_do_not_fit() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        assert!(write_mptable(&mem, 1).is_ok());
        assert!(matches!(
            write_mptable(&mem, 255),
            Err(MpTableError::TooManyCpus(255))
        ));
    }
}
