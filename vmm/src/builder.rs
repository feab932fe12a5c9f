//! Assembles a microVM from a `VmConfig` and runs it: memory and kernel,
//! devices on the MMIO bus, vCPU threads, and the event loop that serves
//! devices and the control API until the VM stops.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use linux_loader::loader::Cmdline;

use crate::api::{ApiServer, DiskSlot, VmFacts};
use crate::arch::{boot, cpuid, layout, mptable, regs};
use crate::config::{VmConfig, MAX_VCPUS, MIN_MEM_MIB};
use crate::control::{Outcome, SignalWatcher, StopReason, StopWatcher, VmmControl};
use crate::devices::irq::IrqLine;
use crate::devices::serial::{ConsoleSink, SerialConsole};
use crate::devices::virtio::block::Block;
use crate::devices::virtio::fs::Fs;
use crate::devices::virtio::mmio::{MmioTransport, QUEUE_NOTIFY_OFFSET};
use crate::devices::virtio::net::Net;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::{Interrupt, VirtioDevice};
use crate::jail::JailConfig;
use crate::pvm;
use crate::seccomp::Filters;
use crate::vstate::vcpu::{ExitDevices, Vcpu, VcpuStop};
use crate::vstate::vm::Vm;

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("--mem-mib {0} is too small: a guest needs at least {MIN_MEM_MIB} MiB")]
    TooLittleMemory(u64),
    #[error("--vcpus must be at least 1")]
    NoVcpus,
    #[error(
        "--vcpus {0}: this is a PVM host, where guests run on one vCPU only (secondary vCPUs \
         start through a real-mode and 32-bit trampoline that PVM cannot run); use --vcpus 1, \
         or standard KVM for more"
    )]
    VcpusOnPvm(u8),
    #[error("--vcpus {0}: at most {MAX_VCPUS} vCPUs")]
    TooManyVcpus(u8),
    #[error("too many devices: {0} virtio devices, but only IRQs {first}..={last} are free", first = layout::FIRST_DEVICE_IRQ, last = layout::LAST_DEVICE_IRQ)]
    TooManyDevices(usize),
    #[error(transparent)]
    Vm(#[from] crate::vstate::vm::VmError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    #[error(transparent)]
    Cpuid(#[from] cpuid::CpuidError),
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
    #[error(transparent)]
    Block(#[from] crate::devices::virtio::block::BlockError),
    #[error(transparent)]
    Net(#[from] crate::devices::virtio::net::NetError),
    #[error(transparent)]
    Vsock(#[from] crate::devices::virtio::vsock::VsockError),
    #[error(transparent)]
    Fs(#[from] crate::devices::virtio::fs::FsError),
    #[error(transparent)]
    Api(#[from] crate::api::ApiError),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    #[error(transparent)]
    Jail(#[from] crate::jail::JailError),
    #[error("cannot open the console log {path}: {source}")]
    ConsoleLog {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot set up {what}: {source}")]
    Setup {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("KVM refused {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("the event loop failed: {0}")]
    EventLoop(String),
}

fn setup(what: &'static str) -> impl FnOnce(std::io::Error) -> BuildError {
    move |source| BuildError::Setup { what, source }
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> BuildError {
    move |source| BuildError::Kvm { what, source }
}

/// A built VM, ready to run.
pub struct Vmm {
    vm: Vm,
    vcpus: Vec<Vcpu>,
    subscribers: Vec<Subscriber>,
    api: Option<ApiServer>,
    /// Removed on exit: the vsock device itself is never dropped while a vCPU
    /// thread may still hold it.
    vsock_uds: Option<PathBuf>,
    control: Arc<VmmControl>,
    /// Whether the threads install their seccomp filters.
    seccomp: bool,
    jail: Option<JailConfig>,
}

impl Vmm {
    /// Builds the VM described by `config`. `started` is when the process
    /// began, for boot timing.
    pub fn build(config: &VmConfig, started: Instant) -> Result<Self, BuildError> {
        if config.mem_mib < MIN_MEM_MIB {
            return Err(BuildError::TooLittleMemory(config.mem_mib));
        }
        let pvm = config.pvm.resolve();
        match config.vcpus {
            0 => return Err(BuildError::NoVcpus),
            1 => {}
            n if pvm => return Err(BuildError::VcpusOnPvm(n)),
            n if n > MAX_VCPUS => return Err(BuildError::TooManyVcpus(n)),
            _ => {}
        }
        tracing::info!(
            pvm,
            vcpus = config.vcpus,
            mem_mib = config.mem_mib,
            "building the microVM"
        );

        let vm = Vm::new(config.mem_mib << 20)?;
        let control = Arc::new(VmmControl::new().map_err(setup("the stop eventfd"))?);

        // Devices, each in its MMIO slot with its own IRQ.
        let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
        if let Some(vsock) = &config.vsock {
            devices.push(Box::new(Vsock::new(vsock.guest_cid, &vsock.uds_path)?));
        }
        let mut disk_handles = Vec::new();
        let disk_specs = config
            .disks
            .iter()
            .map(|d| (Some(d.path.as_path()), d.read_only))
            .chain(std::iter::repeat_n((None, true), config.spare_disks));
        for (i, (path, read_only)) in disk_specs.enumerate() {
            let block = Block::new(path, read_only, &format!("husk-disk{i}"))?;
            disk_handles.push((devices.len(), block.handle()));
            devices.push(Box::new(block));
        }
        // Network devices after the disks: the disks keep the MMIO slots and
        // IRQs they have without a network.
        for net in &config.nets {
            devices.push(Box::new(Net::new(net)?));
        }
        for fs in &config.fs {
            devices.push(Box::new(Fs::new(fs, control.clone())?));
        }
        let irq_count = (layout::LAST_DEVICE_IRQ - layout::FIRST_DEVICE_IRQ + 1) as usize;
        if devices.len() > irq_count {
            return Err(BuildError::TooManyDevices(devices.len()));
        }

        let mut cmdline =
            Cmdline::new(layout::CMDLINE_MAX_LEN).map_err(boot::BootError::Cmdline)?;
        cmdline
            .insert_str(&config.cmdline)
            .map_err(boot::BootError::Cmdline)?;
        if pvm {
            cmdline
                .insert_str(pvm::GUEST_CMDLINE)
                .map_err(boot::BootError::Cmdline)?;
        }

        let mut transports = Vec::new();
        for (slot, device) in devices.into_iter().enumerate() {
            let base = layout::MMIO_GAP_START + slot as u64 * layout::MMIO_DEVICE_SIZE;
            let irq = layout::FIRST_DEVICE_IRQ + slot as u32;
            let line = IrqLine::new(irq).map_err(setup("a device IRQ eventfd"))?;
            vm.fd
                .register_irqfd(line.eventfd(), irq)
                .map_err(kvm("a device irqfd"))?;
            for (queue, evt) in device.queue_events().iter().enumerate() {
                let addr = kvm_ioctls::IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET);
                vm.fd
                    .register_ioevent(evt, &addr, queue as u32)
                    .map_err(kvm("a queue ioeventfd"))?;
            }
            cmdline
                .add_virtio_mmio_device(
                    layout::MMIO_DEVICE_SIZE,
                    vm_memory::GuestAddress(base),
                    irq,
                    None,
                )
                .map_err(boot::BootError::Cmdline)?;
            let transport = MmioTransport::new(device, vm.mem.clone(), Interrupt::new(line))
                .map_err(|e| setup("a virtio queue")(std::io::Error::other(e.to_string())))?;
            transports.push(Arc::new(Mutex::new(transport)));
        }

        // Kernel, initrd, boot parameters.
        let (kernel, kernel_end) = boot::load_kernel(&vm.mem, &config.kernel)?;
        let initrd = config
            .initrd
            .as_deref()
            .map(|path| boot::load_initrd(&vm.mem, path, kernel_end))
            .transpose()?;
        boot::write_boot_params(&vm.mem, &boot::BootImages { cmdline, initrd })?;
        regs::write_boot_tables(&vm.mem)?;
        mptable::write_mptable(&vm.mem, config.vcpus)?;

        // The console.
        let out: Box<dyn Write + Send> = match &config.console_log {
            Some(path) => {
                Box::new(File::create(path).map_err(|source| BuildError::ConsoleLog {
                    path: path.clone(),
                    source,
                })?)
            }
            None => Box::new(std::io::stdout()),
        };
        let serial_irq =
            IrqLine::new(layout::SERIAL_IRQ).map_err(setup("the serial IRQ eventfd"))?;
        vm.fd
            .register_irqfd(serial_irq.eventfd(), layout::SERIAL_IRQ)
            .map_err(kvm("the serial irqfd"))?;
        let serial = SerialConsole::new(
            serial_irq,
            ConsoleSink::new(out, control.guest_panicked.clone()),
        );
        let exit_devices = Arc::new(ExitDevices {
            serial: Mutex::new(serial),
            mmio: transports.clone(),
        });

        // vCPUs.
        let masked = if pvm { pvm::MASKED_FEATURES } else { &[] };
        let base_cpuid = cpuid::base_cpuid(&vm.kvm, masked)?;
        let mut vcpus = Vec::new();
        for id in 0..config.vcpus {
            let fd = vm.fd.create_vcpu(u64::from(id)).map_err(kvm("a vCPU"))?;
            cpuid::set_vcpu_cpuid(&fd, &base_cpuid, id, config.vcpus)?;
            regs::setup_msrs(&fd)?;
            regs::setup_regs(&fd, kernel.entry.0)?;
            regs::setup_sregs(&fd)?;
            regs::setup_fpu(&fd)?;
            regs::setup_lapic(&fd)?;
            vcpus.push(Vcpu {
                fd,
                id,
                mem: vm.mem.clone(),
                devices: exit_devices.clone(),
                pvm,
                vmm_start: started,
            });
        }

        let api = match &config.api_sock {
            Some(path) => {
                let disks = disk_handles
                    .into_iter()
                    .map(|(slot, handle)| DiskSlot {
                        handle,
                        transport: transports[slot].clone(),
                    })
                    .collect();
                let facts = VmFacts {
                    vcpus: config.vcpus,
                    mem_mib: config.mem_mib,
                    pvm,
                    started,
                };
                Some(ApiServer::bind(path, disks, facts, control.clone())?)
            }
            None => None,
        };

        let subscribers = transports.into_iter().map(|t| t as Subscriber).collect();
        Ok(Self {
            vm,
            vcpus,
            subscribers,
            api,
            vsock_uds: config.vsock.as_ref().map(|v| v.uds_path.clone()),
            control,
            seccomp: config.seccomp,
            jail: config.jail.clone(),
        })
    }

    /// Runs the VM until it stops; returns how it ended.
    pub fn run(self) -> Result<Outcome, BuildError> {
        // While this is the only thread, and before any guest instruction.
        if let Some(jail) = &self.jail {
            let took = crate::jail::enter(jail, self.vcpus.len() as u8)?;
            tracing::info!(
                root = %jail.root.display(),
                uid = jail.uid,
                gid = jail.gid,
                took_us = took.as_micros() as u64,
                "jail entered"
            );
        }
        let mut events: EventManager<Subscriber> =
            EventManager::new().map_err(|e| BuildError::EventLoop(e.to_string()))?;
        for subscriber in self.subscribers {
            events.add_subscriber(subscriber);
        }
        events.add_subscriber(Arc::new(Mutex::new(StopWatcher(self.control.clone()))));
        let signals = SignalWatcher::new(self.control.clone())
            .map_err(|e| setup("the stop-signal handler")(e.into()))?;
        events.add_subscriber(Arc::new(Mutex::new(signals)));
        if let Some(api) = self.api {
            tracing::info!(path = %api.path().display(), "control API listening");
            events.add_subscriber(Arc::new(Mutex::new(api)));
        }
        let filters = match self.seccomp {
            true => {
                crate::seccomp::report_sigsys().map_err(setup("the SIGSYS handler"))?;
                Some(Arc::new(Filters::compile()?))
            }
            false => {
                tracing::warn!("running without seccomp filters (--no-seccomp)");
                None
            }
        };
        for vcpu in self.vcpus {
            let control = self.control.clone();
            let filters = filters.clone();
            std::thread::Builder::new()
                .name(format!("vcpu{}", vcpu.id))
                .spawn(move || {
                    // Before the guest's first instruction on this vCPU.
                    if let Some(Err(e)) = filters.as_ref().map(|f| f.install_vcpu()) {
                        control.stop(StopReason::Vcpu(VcpuStop::Fatal(e.to_string())));
                        return;
                    }
                    let stop = vcpu.run();
                    control.stop(StopReason::Vcpu(stop));
                })
                .map_err(setup("a vCPU thread"))?;
        }
        // Before this thread serves anything the guest asks for; after the
        // vCPU threads exist, which must not inherit this filter.
        if let Some(filters) = &filters {
            filters.install_vmm()?;
            tracing::info!("seccomp filters installed");
        }
        while !self.control.stopping() {
            events
                .run()
                .map_err(|e| BuildError::EventLoop(e.to_string()))?;
        }
        // The VM fd and memory must outlive the vCPU threads, which are still
        // blocked in KVM_RUN: the process exits right after this returns.
        std::mem::forget(self.vm);
        if let Some(path) = &self.vsock_uds {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::debug!(path = %path.display(), "vsock socket already gone: {e}");
            }
        }
        self.control
            .outcome()
            .ok_or_else(|| BuildError::EventLoop("stopped without a reason".into()))
    }
}
