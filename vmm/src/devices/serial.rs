//! The guest's serial console (COM1, 16550A via vm-superio) and the sink its
//! output goes to. The sink also notices a kernel panic, so that a guest that
//! panics and resets is reported as dead rather than as shut down.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vm_superio::Serial;

use super::irq::IrqLine;

/// What the kernel prints first when it panics.
const PANIC_MARKER: &[u8] = b"Kernel panic";

/// Where console bytes go, with a watch for the panic marker.
pub struct ConsoleSink {
    out: Box<dyn Write + Send>,
    matched: usize,
    panicked: Arc<AtomicBool>,
}

impl ConsoleSink {
    pub fn new(out: Box<dyn Write + Send>, panicked: Arc<AtomicBool>) -> Self {
        Self {
            out,
            matched: 0,
            panicked,
        }
    }

    fn watch(&mut self, byte: u8) {
        if byte == PANIC_MARKER[self.matched] {
            self.matched += 1;
            if self.matched == PANIC_MARKER.len() {
                self.panicked.store(true, Ordering::SeqCst);
                self.matched = 0;
            }
        } else {
            self.matched = usize::from(byte == PANIC_MARKER[0]);
        }
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for &byte in buf {
            self.watch(byte);
        }
        // A console that cannot be written must not stop the guest.
        if let Err(e) = self.out.write_all(buf) {
            tracing::debug!("console output lost: {e}");
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// The COM1 UART; port offsets 0..8 from 0x3f8.
pub struct SerialConsole {
    uart: Serial<IrqLine, vm_superio::serial::NoEvents, ConsoleSink>,
}

impl SerialConsole {
    pub fn new(irq: IrqLine, sink: ConsoleSink) -> Self {
        Self {
            uart: Serial::new(irq, sink),
        }
    }

    pub fn read(&mut self, offset: u8) -> u8 {
        self.uart.read(offset)
    }

    pub fn write(&mut self, offset: u8, value: u8) {
        if let Err(e) = self.uart.write(offset, value) {
            tracing::debug!("serial write failed: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sink() -> (ConsoleSink, Arc<AtomicBool>) {
        let flag = Arc::new(AtomicBool::new(false));
        (ConsoleSink::new(Box::new(io::sink()), flag.clone()), flag)
    }

    #[test]
    fn panic_marker_is_seen_across_writes() {
        let (mut s, flag) = sink();
        s.write_all(b"[ 1.0] Kernel pa").unwrap();
        assert!(!flag.load(Ordering::SeqCst));
        s.write_all(b"nic - not syncing").unwrap();
        assert!(flag.load(Ordering::SeqCst));
    }

    #[test]
    fn ordinary_output_is_not_a_panic() {
        let (mut s, flag) = sink();
        s.write_all(b"KKernel pani\nKernel: panicky text").unwrap();
        assert!(!flag.load(Ordering::SeqCst));
    }
}
