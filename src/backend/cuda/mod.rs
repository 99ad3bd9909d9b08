//! The CUDA backend: hand-written kernels (kernels/*.cu, compiled by NVRTC) for everything
//! but the GEMMs, which go through cuBLASLt. Weights live on the device in bf16; the residual
//! stream stays f32; sub-layer activations are bf16.
//!
//! Libraries are loaded dynamically. Everything that can be missing (driver, cuBLASLt, NVRTC,
//! a visible GPU) is checked before first use and reported as a device error, never a panic.
mod capture_copy;
pub mod gemm;
pub mod modules;
pub mod resident;
pub mod tables;
pub mod upload;

use super::{ActKind, AttentionInput, Backend, CaptureLayout, Heads, NonFinite, Norm};
use crate::backend::moments::PointMoments;
use crate::model::arch::{MlpKind, NormKind};
use crate::engine::capture::{CaptureSink, Captured};
use crate::engine::plan::BatchPlan;
use crate::engine::sample::SampleParams;
use crate::engine::steer::PointSteering;
use crate::error::{Error, Result};
use crate::model::weights::{F32Data, MatrixSource};
use cudarc::driver::{CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig};
use resident::{ResidentTables, MAX_RESIDENT_TABLES};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use super::profile::OpTimes;
use tables::{PassLayout, Segments};

/// Parses `--device`: None for the CPU, Some(ordinal) for `cuda` / `cuda:N`.
pub fn parse_device(device: &str) -> Result<Option<usize>> {
    match device {
        "cpu" => Ok(None),
        "cuda" => Ok(Some(0)),
        d => match d.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Ok(Some(n)),
            _ => Err(Error::input(format!("--device `{d}`: expected cpu, cuda or cuda:N"))),
        },
    }
}

fn dev_err(what: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::Device(format!("CUDA {what}: {e}"))
}

/// Checks that the libraries the backend needs can be loaded (cudarc's loaders panic otherwise).
fn preflight() -> Result<()> {
    // SAFETY: these only try to dlopen the libraries.
    unsafe {
        if !cudarc::driver::sys::is_culib_present() {
            return Err(Error::Device(
                "the NVIDIA driver library (libcuda.so) was not found: install the NVIDIA driver, or use --device cpu".into(),
            ));
        }
        if !cudarc::cublaslt::sys::is_culib_present() {
            return Err(Error::Device(
                "cuBLASLt (libcublasLt.so) was not found: install the CUDA toolkit or `pip install nvidia-cublas-cu12`, and add its lib directory to LD_LIBRARY_PATH".into(),
            ));
        }
    }
    Ok(())
}

/// Freed activations stay in the device's memory pool rather than going back to the driver
/// at every synchronisation (the pool's default): each pass allocates the same sizes again, and
/// memory the driver must map anew costs more than the kernels that use it. Best effort: a
/// device without memory pools allocates synchronously anyway.
fn keep_freed_memory_pooled(ctx: &Arc<CudaContext>) {
    use cudarc::driver::{result, sys};
    // SAFETY: the device handle is the context's; the attribute takes a u64.
    unsafe {
        if let Ok(pool) = result::device::get_mem_pool(ctx.cu_device()) {
            let mut keep_all = u64::MAX;
            let _ = result::mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut keep_all as *mut u64 as *mut std::ffi::c_void,
            );
        }
    }
}

pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub total_memory: usize,
}

pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    functions: HashMap<String, CudaFunction>,
    blas: gemm::Lt,
    _workspace: CudaSlice<u8>,
    pub info: DeviceInfo,
    /// Steering directions uploaded once and reused by every pass that steers with them.
    resident: Mutex<ResidentTables<CudaSlice<f32>>>,
    /// Per-pass buffers handed back by finished passes (one per pass in flight at a time).
    pool: Mutex<Vec<PassBuffers>>,
    /// Pinned buffers that weights pass through on their way to the device.
    staging: Mutex<upload::Staging>,
    /// `resid bench --profile`: events recorded at the forward pass's operation marks.
    profiling: AtomicBool,
    marks: Mutex<EventMarks>,
    /// GEMMs of at most MAX_GEMV_ROWS rows use the GEMV kernel (`RESID_CUDA_GEMV=0`: cuBLASLt).
    gemv: bool,
    /// Kernels are launched with programmatic dependent launch (sm_90+; `RESID_CUDA_PDL=0`
    /// turns it off; cleared if the driver refuses such a launch): see `launch_words`.
    pdl: AtomicBool,
    /// ALiBi slopes on the device, uploaded once rather than per layer.
    alibi: Mutex<Option<(Vec<f32>, CudaSlice<f32>)>>,
    /// The stream that copies captured rows out while the pass runs (capture_copy.rs).
    copy_stream: OnceLock<capture_copy::CopyStream>,
}

/// Operation marks as events on the stream; resolved into times once the stream has run past
/// them.
#[derive(Default)]
struct EventMarks {
    last: Option<CudaEvent>,
    /// When the host made the previous mark.
    last_host: Option<std::time::Instant>,
    pending: Vec<(&'static str, CudaEvent)>,
    spare: Vec<CudaEvent>,
    times: OpTimes,
    /// The first failure (marks cannot return errors); reported by `take_profile`.
    error: Option<String>,
}

/// Marks kept unresolved before the stream is waited for (a few passes' worth).
const MAX_PENDING_MARKS: usize = 8192;

impl EventMarks {
    fn record(&mut self, ctx: &Arc<CudaContext>, stream: &CudaStream, label: &'static str) -> std::result::Result<(), cudarc::driver::DriverError> {
        let event = match self.spare.pop() {
            Some(e) => e,
            None => ctx.new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))?,
        };
        event.record(stream)?;
        self.pending.push((label, event));
        let now = std::time::Instant::now();
        if let Some(prev) = self.last_host.replace(now) {
            self.times.charge_host(label, (now - prev).as_secs_f64());
        }
        if self.pending.len() >= MAX_PENDING_MARKS {
            stream.synchronize()?;
            self.resolve()?;
        }
        Ok(())
    }

    /// Charges each completed mark the time since the one before it (the stream must have run
    /// past every pending event).
    fn resolve(&mut self) -> std::result::Result<(), cudarc::driver::DriverError> {
        for (label, event) in std::mem::take(&mut self.pending) {
            // The starting mark has no predecessor: it only starts the clock.
            if let Some(prev) = self.last.take() {
                self.times.charge(label, prev.elapsed_ms(&event)? as f64 / 1e3);
                self.spare.push(prev);
            }
            self.last = Some(event);
        }
        Ok(())
    }
}

/// Device buffers a pass needs, kept and grown across passes instead of allocated per pass.
/// A pass owns its set from `begin_pass` to `end_pass`; work on the one stream is ordered, so
/// the next pass's upload cannot overtake the kernels of the previous owner.
#[derive(Default)]
struct PassBuffers {
    /// The pass's tables (tables.rs), uploaded with one copy.
    tables: Option<CudaSlice<u8>>,
    /// Capture plane `[rows, slots, hidden]` f32.
    plane: Option<CudaSlice<f32>>,
    /// Split-decode attention partials.
    part_o: Option<CudaSlice<f32>>,
    part_ml: Option<CudaSlice<f32>>,
    /// Events marking when each captured slot has been written (capture_copy.rs).
    capture_events: Vec<CudaEvent>,
}

/// A buffer of at least `n` elements (grown to a power of two so that growth is rare).
fn grow<T: cudarc::driver::DeviceRepr>(stream: &Arc<CudaStream>, buf: &mut Option<CudaSlice<T>>, n: usize) -> Result<()> {
    if buf.as_ref().is_some_and(|b| b.len() >= n) {
        return Ok(());
    }
    *buf = None; // free first: the old contents are not needed
    // SAFETY: every user writes the elements it reads (tables by upload, the plane is zeroed
    // per pass, attention partials by the kernel that fills them).
    let b = unsafe { stream.alloc::<T>(n.max(1).next_power_of_two()) }
        .map_err(|e| Error::Device(format!("CUDA allocation of {n} elements: {e}")))?;
    *buf = Some(b);
    Ok(())
}

pub struct CudaMatrix {
    w: CudaSlice<u16>,
    rows: usize,
    cols: usize,
}

pub struct CudaVector {
    bf16: CudaSlice<u16>,
    /// f32 copy: GEMM biases into f32 outputs, and the final norm of captured rows.
    f32: CudaSlice<f32>,
}

enum Buf {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<u16>),
}

pub struct CudaAct {
    buf: Buf,
    rows: usize,
    cols: usize,
}

pub struct CudaKv {
    stored_layers: usize,
    k: Vec<CudaSlice<u16>>,
    v: Vec<CudaSlice<u16>>,
}

pub struct CudaPass {
    plan: BatchPlan,
    rows: usize,
    hidden: usize,
    /// Values per captured row (the hidden size, or heads·head_dim for `hook_z` alone).
    width: usize,
    /// Where each table of `layout` lives: the device address of the uploaded image.
    base: u64,
    layout: PassLayout,
    /// Device address of the capture plane (0 without capture).
    plane: u64,
    max_q_len: usize,
    max_kv_len: usize,
    decode: bool,
    /// Attention takes the pass by shared reference and grows the partials in place.
    bufs: RefCell<PassBuffers>,
    /// The resident steering tables this pass's descriptors point into, kept alive until it ends.
    _resident: Vec<Arc<CudaSlice<f32>>>,
    /// (capture slot, index into `bufs.capture_events`) for every slot a queued kernel wrote.
    written: Vec<(usize, usize)>,
}

impl CudaKv {
    /// The K and V caches that `layer` stores into.
    fn layer_mut(&mut self, layer: usize) -> (&mut CudaSlice<u16>, &mut CudaSlice<u16>) {
        let l = layer % self.stored_layers;
        (&mut self.k[l], &mut self.v[l])
    }
}

impl CudaPass {
    fn at(&self, offset: usize) -> u64 {
        self.base + offset as u64
    }

    /// The rotary arguments of rope.cu and gemv_rope.cu, in their order: positions, inverse
    /// frequencies (null: rotate nothing, for ALiBi models), mscale, rotated dims, KV slots.
    fn rotary(&self, heads: Heads) -> (u64, u64, f32, i32, u64) {
        let inv_freq = self.layout.inv_freq.map_or(0, |o| self.at(o));
        (self.at(self.layout.positions), inv_freq, 1.0, heads.head_dim as i32, self.at(self.layout.kv_slot))
    }

    /// Device addresses of a segment list: begin, end, dst, weight.
    fn segs(&self, s: &Segments) -> [u64; 4] {
        [self.at(s.begin), self.at(s.end), self.at(s.dst), self.at(s.weight)]
    }

    /// The steering kernel arguments (row slot map, slot descriptors) of a point: the tables
    /// uploaded for it at begin_pass; null pointers without steering.
    fn steer_args(&self, steer: Option<&PointSteering>) -> Result<(u64, u64)> {
        match steer {
            None => Ok((0, 0)),
            Some(st) => match self.layout.steer.get(st.index).copied().flatten() {
                Some(m) if m.slots == st.slots.len() => Ok((self.at(m.row_slot), self.at(m.table))),
                _ => Err(Error::Device(format!("steering at point {} was not planned when the pass began", st.index))),
            },
        }
    }

    /// Capture slot `slot`'s plane (slot s of plane row r is at (r·slots + s)·width, tables.rs)
    /// and the pass's capture maps.
    fn slot_plane(&self, slot: usize) -> Result<(u64, tables::CaptureMaps)> {
        match self.layout.capture {
            Some(c) if slot < c.slots => Ok((self.plane + (slot * self.width * 4) as u64, c)),
            _ => Err(Error::Device(format!("capture slot {slot} is not in this pass's capture layout"))),
        }
    }

    /// The fused residual kernel's capture arguments (capture row map, plane): last/all
    /// captures go through the kernel, means through mean_capture after it.
    fn capture_args(&self, plane: Option<(u64, tables::CaptureMaps)>) -> (u64, u64) {
        match plane {
            Some((plane, c)) => c.capture_row.map_or((0, 0), |map| (self.at(map), plane)),
            None => (0, 0),
        }
    }
}

fn to_bf16_bits(data: &[f32]) -> Vec<u16> {
    data.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect()
}

/// Threads per block for row kernels: a function of the hidden size only, so that results do
/// not depend on the batch.
fn row_block(h: usize) -> u32 {
    (h.div_ceil(8).div_ceil(32) * 32).clamp(128, 1024) as u32
}

/// Token rows up to which GEMMs run on kernels/gemv.cu (entry points gemv_t1..gemv_t4), and
/// its output columns per block (one per warp).
const MAX_GEMV_ROWS: usize = 4;
const GEMV_WARPS: usize = 8;

fn cfg(grid: (u32, u32, u32), block: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: grid, block_dim: (block, 1, 1), shared_mem_bytes: 0 }
}

impl CudaBackend {
    /// Opens GPU `ordinal`, compiles (or loads cached) kernels and creates the cuBLASLt handle.
    pub fn new(ordinal: usize) -> Result<Self> {
        // cudarc panics on a missing symbol; turn any such panic into a device error.
        match std::panic::catch_unwind(|| Self::open(ordinal)) {
            Ok(r) => r,
            Err(p) => {
                let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
                Err(Error::Device(format!("CUDA initialisation failed: {}", msg.unwrap_or_else(|| "unknown panic".into()))))
            }
        }
    }

    fn open(ordinal: usize) -> Result<Self> {
        preflight()?;
        let count = CudaContext::device_count().map_err(dev_err("device count"))?;
        if count <= 0 {
            return Err(Error::Device("no CUDA GPU is visible (check CUDA_VISIBLE_DEVICES and nvidia-smi)".into()));
        }
        if ordinal >= count as usize {
            return Err(Error::Device(format!("cuda:{ordinal} does not exist: {count} GPU(s) visible (cuda:0..cuda:{})", count - 1)));
        }
        let ctx = CudaContext::new(ordinal).map_err(dev_err("context creation"))?;
        let info = DeviceInfo {
            ordinal,
            name: ctx.name().map_err(dev_err("device name"))?,
            compute_capability: ctx.compute_capability().map_err(dev_err("compute capability"))?,
            total_memory: ctx.total_mem().map_err(dev_err("memory query"))?,
        };
        keep_freed_memory_pooled(&ctx);
        let arch = modules::virtual_arch(info.compute_capability)?;
        let functions = modules::load_all(&ctx, arch)?;
        let pdl = info.compute_capability.0 >= 9 && std::env::var("RESID_CUDA_PDL").map_or(true, |v| v != "0");
        let stream = ctx.default_stream();
        let workspace = stream.alloc_zeros::<u8>(gemm::Lt::workspace_bytes()).map_err(dev_err("workspace allocation"))?;
        let ws_ptr = {
            let (p, _sync) = workspace.device_ptr(&stream);
            p
        };
        let blas = gemm::Lt::new(ws_ptr)?;
        Ok(CudaBackend {
            ctx,
            stream,
            functions,
            blas,
            _workspace: workspace,
            info,
            resident: Mutex::new(ResidentTables::new(MAX_RESIDENT_TABLES)),
            pool: Mutex::new(Vec::new()),
            staging: Mutex::new(upload::Staging::default()),
            profiling: AtomicBool::new(false),
            marks: Mutex::new(EventMarks::default()),
            alibi: Mutex::new(None),
            copy_stream: OnceLock::new(),
            gemv: std::env::var("RESID_CUDA_GEMV").map_or(true, |v| v != "0"),
            pdl: AtomicBool::new(pdl),
        })
    }

    /// Bytes of device memory in use (all processes), from the driver.
    pub fn memory_used(&self) -> Result<usize> {
        let (free, total) = self.ctx.mem_get_info().map_err(dev_err("memory query"))?;
        Ok(total - free)
    }

    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(dev_err("synchronize"))
    }

    fn f(&self, name: &str) -> Result<&CudaFunction> {
        self.functions.get(name).ok_or_else(|| Error::Device(format!("kernel entry point `{name}` was not loaded")))
    }

    fn upload<T: cudarc::driver::DeviceRepr>(&self, data: &[T]) -> Result<CudaSlice<T>> {
        if data.is_empty() {
            // A zero-length allocation is not allowed; kernels never read an empty table.
            // SAFETY: the one element is never read.
            return unsafe { self.stream.alloc::<T>(1) }.map_err(dev_err("allocation"));
        }
        self.stream.clone_htod(data).map_err(dev_err("host-to-device copy"))
    }

    /// The device address of `slopes`, uploaded when they differ from the last ones. A replaced
    /// table is freed in stream order, after the kernels that read it.
    fn alibi_slopes(&self, slopes: &[f32]) -> Result<u64> {
        let mut cache = self.alibi.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((host, dev)) = cache.as_ref() {
            if host[..] == *slopes {
                return Ok(self.ptr(dev));
            }
        }
        let dev = self.upload(slopes)?;
        let addr = self.ptr(&dev);
        *cache = Some((slopes.to_vec(), dev));
        Ok(addr)
    }

    /// `Some(rows)` when a product of `rows` token rows over `k` inputs takes the GEMV kernels.
    fn gemv_rows(&self, rows: usize, k: usize) -> Option<usize> {
        (self.gemv && (1..=MAX_GEMV_ROWS).contains(&rows) && k.is_multiple_of(8)).then_some(rows)
    }

    fn zeros<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        self.stream.alloc_zeros::<T>(n.max(1)).map_err(|e| Error::Device(format!("CUDA allocation of {n} elements: {e}")))
    }

    /// Memory that the caller writes before any kernel reads it: no memset queued. (The CPU
    /// emulator fills it with NaN, so a read of an unwritten element fails the selftest.)
    fn uninit<T: cudarc::driver::DeviceRepr>(&self, n: usize) -> Result<CudaSlice<T>> {
        // SAFETY: plain-data device memory; every user writes it before reading (see callers).
        unsafe { self.stream.alloc::<T>(n.max(1)) }.map_err(|e| Error::Device(format!("CUDA allocation of {n} elements: {e}")))
    }

    /// Launches kernel `name` with its arguments as words (`KernelArg`). With `pdl`, through
    /// programmatic dependent launch: the kernel may start while the one ahead of it in the
    /// stream finishes, and waits for it inside (kernels/common.cuh: every kernel begins with
    /// `resid_pdl_prologue`; the GEMVs load their first weights before they wait). A decode step
    /// is a chain of short kernels, so each one hides its launch, and each GEMV a first memory
    /// round trip, behind the kernel ahead.
    fn launch_words(&self, name: &str, cfg: LaunchConfig, words: &[u64]) -> Result<()> {
        use cudarc::driver::sys;
        let f = self.f(name)?.cu_function();
        // On the stack: a decode step makes hundreds of launches.
        let mut slots = [std::ptr::null_mut::<std::ffi::c_void>(); MAX_KERNEL_ARGS];
        let Some(args) = slots.get_mut(..words.len()) else {
            return Err(Error::Device(format!("kernel {name}: {} arguments, at most {MAX_KERNEL_ARGS} supported", words.len())));
        };
        for (slot, word) in args.iter_mut().zip(words) {
            *slot = word as *const u64 as *mut std::ffi::c_void;
        }
        self.ctx.bind_to_thread().map_err(dev_err("bind context"))?;
        let (grid, block) = (cfg.grid_dim, cfg.block_dim);
        if self.pdl.load(Ordering::Relaxed) {
            // SAFETY: a plain-data C struct; zero is a valid value of every field.
            let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
            attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
            attr.value.programmaticStreamSerializationAllowed = 1;
            let config = sys::CUlaunchConfig {
                gridDimX: grid.0,
                gridDimY: grid.1,
                gridDimZ: grid.2,
                blockDimX: block.0,
                blockDimY: block.1,
                blockDimZ: block.2,
                sharedMemBytes: cfg.shared_mem_bytes,
                hStream: self.stream.cu_stream(),
                attrs: &mut attr,
                numAttrs: 1,
            };
            // SAFETY: the words follow the kernel's contract in kernels/*.cu (the `launch!`
            // callers), and every kernel waits for the one ahead before touching activations.
            use sys::cudaError_enum::{CUDA_ERROR_INVALID_VALUE, CUDA_ERROR_NOT_SUPPORTED};
            match unsafe { sys::cuLaunchKernelEx(&config, f, args.as_mut_ptr(), std::ptr::null_mut()) }.result() {
                Ok(()) => return Ok(()),
                // Never seen, but a driver that refuses the attribute should cost speed, not the
                // run: a plain launch is always correct (the kernels' waits then return at once).
                // Any other error is the kernel's or the context's, and is reported.
                Err(e) if matches!(e.0, CUDA_ERROR_NOT_SUPPORTED | CUDA_ERROR_INVALID_VALUE) => {
                    self.pdl.store(false, Ordering::Relaxed);
                    eprintln!("resid: programmatic dependent launch of {name} was refused ({e}); launching kernels without it");
                }
                Err(e) => return Err(Error::Device(format!("kernel {name} launch: {e}"))),
            }
        }
        // SAFETY: as above.
        unsafe { cudarc::driver::result::launch_kernel(f, grid, block, cfg.shared_mem_bytes, self.stream.cu_stream(), args) }
            .map_err(|e| Error::Device(format!("kernel {name} launch: {e}")))
    }

    fn ptr<T>(&self, s: &CudaSlice<T>) -> u64 {
        let (p, _sync) = s.device_ptr(&self.stream);
        p
    }

    fn ptr_mut<T>(&self, s: &mut CudaSlice<T>) -> u64 {
        let (p, _sync) = s.device_ptr_mut(&self.stream);
        p
    }
}

/// The longest argument list of kernels/*.cu (gemv_rope_tT has 15).
const MAX_KERNEL_ARGS: usize = 16;

/// A kernel argument as the 8-byte word the driver copies it from: a device address, or a
/// 4-byte scalar in the low bytes (the driver reads each parameter's own size, and the words
/// are little-endian).
trait KernelArg {
    fn word(self, be: &CudaBackend) -> u64;
}
impl<T> KernelArg for &CudaSlice<T> {
    fn word(self, be: &CudaBackend) -> u64 {
        be.ptr(self)
    }
}
impl<T> KernelArg for &mut CudaSlice<T> {
    fn word(self, be: &CudaBackend) -> u64 {
        be.ptr_mut(self)
    }
}
impl KernelArg for &u64 {
    fn word(self, _: &CudaBackend) -> u64 {
        *self
    }
}
impl KernelArg for &i32 {
    fn word(self, _: &CudaBackend) -> u64 {
        *self as u32 as u64
    }
}
impl KernelArg for &f32 {
    fn word(self, _: &CudaBackend) -> u64 {
        self.to_bits() as u64
    }
}

/// Launches kernel `$name` of kernels/*.cu with the listed arguments (device buffers, device
/// addresses as u64, i32 and f32 scalars), in the order of its contract there.
macro_rules! launch {
    ($be:expr, $name:expr, $cfg:expr, $($arg:expr),* $(,)?) => {{
        let words = [$( KernelArg::word($arg, $be) ),*];
        $be.launch_words($name, $cfg, &words)?;
    }};
}

// After `launch!`, which it uses.
mod stats;

/// The fused residual kernel's other uses (points inside blocks).
impl CudaBackend {
    /// Mean capture of `width`-wide f32 rows at `src` into a slot's plane (mean_capture.cu),
    /// when the capture is a mean.
    fn mean_capture(&self, pass: &CudaPass, src: u64, width: usize, plane: Option<(u64, tables::CaptureMaps)>) -> Result<()> {
        if let Some((plane, c)) = plane {
            if let Some(m) = c.mean {
                let (nseg, accumulate, w) = (m.count as i32, 0i32, width as i32);
                let [begin, end, dst, weight] = pass.segs(&m);
                launch!(
                    self,
                    "mean_capture",
                    cfg((width.div_ceil(256) as u32, nseg as u32, 1), 256),
                    &src, &w, &begin, &end, &dst, &weight, &plane, &accumulate, &nseg
                );
            }
        }
        Ok(())
    }

    /// [`Backend::branch_step`] on f32 rows at `rows_ptr`: the fused residual kernel without a
    /// norm steers and captures them and adds them into `add_to` (0: no add).
    #[allow(clippy::too_many_arguments)]
    fn branch_rows(&self, pass: &mut CudaPass, rows_ptr: u64, rows: usize, width: usize, steer: Option<&PointSteering>, capture: Option<usize>, add_to: u64) -> Result<()> {
        let (t, h, null, eps) = (rows as i32, width as i32, 0u64, 0f32);
        let (steer_slot, steer_table) = pass.steer_args(steer)?;
        let plane = capture.map(|s| pass.slot_plane(s)).transpose()?;
        let (capture_row, capture_buf) = pass.capture_args(plane);
        launch!(
            self,
            "fused_residual_rms",
            cfg((rows as u32, 1, 1), row_block(width)),
            &rows_ptr, &t, &h, &steer_slot, &steer_table, &capture_row, &capture_buf, &null, &null, &eps, &null, &add_to
        );
        self.mean_capture(pass, rows_ptr, width, plane)?;
        if plane.is_some() {
            let events = &mut pass.bufs.get_mut().capture_events;
            capture_copy::mark_written(&self.ctx, &self.stream, events, &mut pass.written, capture)?;
        }
        Ok(())
    }
}

impl Backend for CudaBackend {
    type Matrix = CudaMatrix;
    type Vector = CudaVector;
    type Act = CudaAct;
    type Kv = CudaKv;
    type Pass = CudaPass;
    type Stats = stats::CudaStats;

    fn compute_type(&self) -> &'static str {
        "bf16"
    }
    fn name(&self) -> String {
        let (a, b) = self.info.compute_capability;
        let gemv = if !self.gemv {
            ", GEMV kernel off"
        } else if a >= 9 && !self.pdl.load(Ordering::Relaxed) {
            ", programmatic launch off"
        } else {
            ""
        };
        format!("cuda:{} ({}, sm_{a}{b}, {:.1} GiB{gemv})", self.info.ordinal, self.info.name, self.info.total_memory as f64 / (1u64 << 30) as f64)
    }

    fn matrix(&self, src: &MatrixSource) -> Result<CudaMatrix> {
        let (rows, cols) = (src.rows(), src.cols());
        // SAFETY: every element is written by the upload below before any kernel reads it.
        let mut w = unsafe { self.stream.alloc::<u16>((rows * cols).max(1)) }
            .map_err(|e| Error::Device(format!("CUDA allocation of a {rows}x{cols} weight matrix: {e}")))?;
        let dst = self.ptr_mut(&mut w);
        self.staging.lock().unwrap_or_else(|p| p.into_inner()).upload(&self.ctx, &self.stream, src, dst)?;
        Ok(CudaMatrix { w, rows, cols })
    }

    fn vector(&self, data: F32Data) -> Result<CudaVector> {
        Ok(CudaVector { bf16: self.upload(&to_bf16_bits(&data))?, f32: self.upload(&data[..])? })
    }

    fn act(&self, rows: usize, cols: usize, kind: ActKind) -> Result<CudaAct> {
        let buf = match kind {
            ActKind::Residual | ActKind::Logits => Buf::F32(self.zeros(rows * cols)?),
            ActKind::Hidden => Buf::Bf16(self.zeros(rows * cols)?),
        };
        Ok(CudaAct { buf, rows, cols })
    }

    fn scratch_act(&self, rows: usize, cols: usize, kind: ActKind) -> Result<CudaAct> {
        let buf = match kind {
            ActKind::Residual | ActKind::Logits => Buf::F32(self.uninit(rows * cols)?),
            ActKind::Hidden => Buf::Bf16(self.uninit(rows * cols)?),
        };
        Ok(CudaAct { buf, rows, cols })
    }

    fn act_from(&self, data: &[f32], rows: usize, cols: usize, kind: ActKind) -> Result<CudaAct> {
        if data.len() != rows * cols {
            return Err(Error::input(format!("{} values for a {rows}x{cols} activation", data.len())));
        }
        let buf = match kind {
            ActKind::Residual | ActKind::Logits => Buf::F32(self.upload(data)?),
            ActKind::Hidden => Buf::Bf16(self.upload(&to_bf16_bits(data))?),
        };
        Ok(CudaAct { buf, rows, cols })
    }

    fn kv_value_bytes(&self) -> usize {
        2
    }

    fn kv(&self, stored_layers: usize, slots: usize, kv_dim: usize) -> Result<CudaKv> {
        let n = stored_layers.max(1);
        let mut k = Vec::with_capacity(n);
        let mut v = Vec::with_capacity(n);
        // Attention reads a slot only after rope_qkv has stored it (prefill masks keys past
        // kv_len before loading them), so the arena is not zeroed.
        for _ in 0..n {
            k.push(self.uninit::<u16>(slots * kv_dim)?);
            v.push(self.uninit::<u16>(slots * kv_dim)?);
        }
        Ok(CudaKv { stored_layers: n, k, v })
    }

    fn kv_copy(&self, kv: &mut CudaKv, heads: Heads, from: usize, to: usize, len: usize) -> Result<()> {
        let kvd = heads.kv_heads * heads.head_dim;
        let slots = kv.k.first().map_or(0, |k| k.len() / kvd.max(1));
        if from.max(to) + len > slots || from.abs_diff(to) < len {
            return Err(Error::input(format!("KV copy of {len} slots from {from} to {to} in an arena of {slots}")));
        }
        if len == 0 {
            return Ok(());
        }
        // Rows of `kvd` values, slot after slot; through a temporary, as one buffer cannot lend
        // a source and a destination view at once.
        for buf in kv.k.iter_mut().chain(kv.v.iter_mut()) {
            let part = self.stream.clone_dtod(&buf.slice(from * kvd..(from + len) * kvd)).map_err(dev_err("device copy"))?;
            self.stream.memcpy_dtod(&part, &mut buf.slice_mut(to * kvd..(to + len) * kvd)).map_err(dev_err("device copy"))?;
        }
        Ok(())
    }

    fn to_host(&self, a: &CudaAct) -> Result<Vec<f32>> {
        let n = a.rows * a.cols;
        Ok(match &a.buf {
            Buf::F32(s) => {
                let mut v = self.stream.clone_dtoh(s).map_err(dev_err("device-to-host copy"))?;
                v.truncate(n);
                v
            }
            Buf::Bf16(s) => {
                let v = self.stream.clone_dtoh(s).map_err(dev_err("device-to-host copy"))?;
                v.into_iter().take(n).map(|b| half::bf16::from_bits(b).to_f32()).collect()
            }
        })
    }

    fn begin_pass(
        &self,
        plan: &BatchPlan,
        inv_freq: &[f32],
        capture: Option<CaptureLayout>,
        steering: &[Option<PointSteering<'_>>],
        hidden: usize,
    ) -> Result<CudaPass> {
        let rows = plan.rows();
        // Resident directions first: the slot descriptors hold their device addresses.
        // `seen` spares the lock for the other points of the same tables (the plans borrow
        // them, so their addresses are stable while this runs).
        let mut keep: Vec<Arc<CudaSlice<f32>>> = Vec::new();
        let mut seen: Vec<(*const Vec<f32>, u64)> = Vec::new();
        let (layout, image) = tables::build(plan, inv_freq, capture, steering, hidden, |table| {
            if let Some(&(_, addr)) = seen.iter().find(|(t, _)| *t == Arc::as_ptr(table)) {
                return Ok(addr);
            }
            let mut cache = self.resident.lock().unwrap_or_else(|p| p.into_inner());
            let dev = cache.get_or_upload(table, |data| self.stream.clone_htod(data).map_err(dev_err("steering upload")))?;
            let addr = self.ptr(&*dev);
            seen.push((Arc::as_ptr(table), addr));
            keep.push(dev);
            Ok(addr)
        })?;
        let mut bufs = self.pool.lock().unwrap_or_else(|p| p.into_inner()).pop().unwrap_or_default();
        // One host-to-device copy for every table of the pass.
        grow(&self.stream, &mut bufs.tables, image.len())?;
        let Some(dev_tables) = bufs.tables.as_mut() else { return Err(Error::Device("pass tables were not allocated".into())) };
        let base = self.ptr_mut(dev_tables);
        let bytes = image.finish(base);
        if !bytes.is_empty() {
            self.stream.memcpy_htod(&bytes[..], &mut dev_tables.slice_mut(..bytes.len())).map_err(dev_err("host-to-device copy"))?;
        }
        let width = capture.map_or(hidden, |c| c.width);
        let mut plane = 0;
        if let Some(c) = &layout.capture {
            let n = c.rows * c.slots * width;
            grow(&self.stream, &mut bufs.plane, n)?;
            if let Some(p) = bufs.plane.as_mut() {
                // Zeroed as the CPU's buffer is: a duplicated point's second slot is never written.
                self.stream.memset_zeros(&mut p.slice_mut(..n)).map_err(dev_err("memset"))?;
                plane = self.ptr_mut(p);
            }
        }
        Ok(CudaPass {
            rows,
            hidden,
            width,
            base,
            layout,
            plane,
            max_q_len: plan.seqs.iter().map(|s| s.len).max().unwrap_or(0),
            max_kv_len: plan.seqs.iter().map(|s| s.past + s.len).max().unwrap_or(0),
            decode: plan.seqs.iter().all(|s| s.len == 1),
            bufs: RefCell::new(bufs),
            _resident: keep,
            written: Vec::new(),
            plan: plan.clone(),
        })
    }

    fn end_pass(&self, pass: CudaPass, sink: Option<&mut CaptureSink>) -> Result<()> {
        let CudaPass { plan, width: h, layout, bufs, _resident, written, .. } = pass;
        let mut bufs = bufs.into_inner();
        let copied = match (&layout.capture, sink, bufs.plane.as_ref()) {
            (Some(cap), Some(sink), Some(plane)) => {
                let n = cap.rows * cap.slots * h;
                let src = plane.slice(..n);
                // Straight into the output when this pass's rows are contiguous there (they are
                // for extraction, scoring and decode steps): slot by slot, overlapping the rest
                // of the pass (capture_copy.rs). Otherwise one copy and a host-side absorb.
                let same_shape = sink.out.points == cap.slots && sink.out.hidden == h;
                let direct = sink.contiguous_start(&plan, cap.rows).filter(|_| same_shape);
                match direct {
                    Some(first) => {
                        let at = first * cap.slots * h;
                        capture_copy::copy_stream(&self.copy_stream, &self.ctx).and_then(|copy| {
                            capture_copy::copy_plane(
                                copy,
                                &self.stream,
                                &mut bufs.capture_events,
                                &written,
                                self.ptr(plane),
                                cap.rows,
                                cap.slots,
                                h,
                                &mut sink.out.data[at..at + n],
                            )
                        })
                    }
                    None => {
                        let mut local = Captured::new(cap.rows, cap.slots, h, Vec::new());
                        let r = self.stream.memcpy_dtoh(&src, &mut local.data[..]).map_err(dev_err("capture copy"));
                        if r.is_ok() {
                            sink.absorb(&plan, &local);
                        }
                        r
                    }
                }
            }
            _ => Ok(()),
        };
        // The buffers go back to the pool even when the copy failed; the copies have finished
        // (or were never queued), so nothing of this pass is still reading them.
        self.pool.lock().unwrap_or_else(|p| p.into_inner()).push(bufs);
        copied
    }

    fn stats_accumulators(&self, moments: &[PointMoments], pairs: bool) -> Result<Option<stats::CudaStats>> {
        self.stats_upload(moments, pairs).map(Some)
    }

    fn end_pass_stats(&self, pass: CudaPass, acc: &mut stats::CudaStats) -> Result<Option<NonFinite>> {
        self.stats_end_pass(pass, acc)
    }

    fn stats_moments(&self, acc: &stats::CudaStats) -> Result<Vec<PointMoments>> {
        self.stats_download(acc)
    }

    fn embed(&self, table: &CudaMatrix, ids: &[u32], norm: Option<Norm<'_, CudaVector>>, out: &mut CudaAct) -> Result<()> {
        let Buf::F32(resid) = &mut out.buf else { return Err(Error::Device("embedding output must be the f32 residual".into())) };
        let ids_dev = self.upload(&ids.iter().map(|&i| i as i32).collect::<Vec<_>>())?;
        let (t, h, vocab, scale) = (ids.len() as i32, table.cols as i32, table.rows as i32, 1.0f32);
        match norm {
            None => launch!(self, "embedding_gather", cfg((ids.len() as u32, 1, 1), 256), &table.w, &ids_dev, resid, &t, &h, &vocab, &scale),
            Some(n) => {
                if n.kind != NormKind::Layer {
                    return Err(Error::Device("only a LayerNorm on the embeddings has a CUDA kernel".into()));
                }
                let bias = n.bias.map_or(0, |b| self.ptr(&b.bf16));
                let block = cfg((ids.len() as u32, 1, 1), row_block(table.cols));
                launch!(self, "embedding_gather_ln", block, &table.w, &ids_dev, resid, &t, &h, &vocab, &scale, &n.weight.bf16, &bias, &n.eps);
            }
        }
        Ok(())
    }

    fn linear(&self, x: &CudaAct, w: &CudaMatrix, b: Option<&CudaVector>, out: &mut CudaAct, accumulate: bool) -> Result<()> {
        let Buf::Bf16(xs) = &x.buf else { return Err(Error::Device("GEMM input must be bf16".into())) };
        let xp = self.ptr(xs);
        let wp = self.ptr(&w.w);
        let (dp, ty) = match &mut out.buf {
            Buf::F32(s) => (self.ptr_mut(s), gemm::OutType::F32),
            Buf::Bf16(s) => (self.ptr_mut(s), gemm::OutType::Bf16),
        };
        let bias = b.map(|b| match ty {
            gemm::OutType::F32 => self.ptr(&b.f32),
            gemm::OutType::Bf16 => self.ptr(&b.bf16),
        });
        // Decode steps of up to 4 sequences: the bandwidth-bound GEMV kernel.
        let accumulate_ok = !accumulate || ty == gemm::OutType::F32;
        if let Some(t) = self.gemv_rows(x.rows, w.cols).filter(|_| accumulate_ok) {
            let name = ["gemv_t1", "gemv_t2", "gemv_t3", "gemv_t4"][t - 1];
            let (n, k) = (w.rows as i32, w.cols as i32);
            let (out_f32, acc) = ((ty == gemm::OutType::F32) as i32, accumulate as i32);
            let bias = bias.unwrap_or(0);
            let grid = w.rows.div_ceil(GEMV_WARPS) as u32;
            launch!(self, name, cfg((grid, 1, 1), 32 * GEMV_WARPS as u32), &wp, &xp, &bias, &dp, &n, &k, &out_f32, &acc);
            return Ok(());
        }
        self.blas.matmul(self.stream.cu_stream() as _, wp, xp, dp, bias, w.rows, x.rows, w.cols, ty, accumulate)
    }

    fn rope_store_kv(
        &self,
        pass: &CudaPass,
        qkv: &CudaAct,
        bias: Option<&CudaVector>,
        qk_norm: Option<(&CudaVector, &CudaVector, f32)>,
        heads: Heads,
        kv: &mut CudaKv,
        layer: usize,
        q: &mut CudaAct,
    ) -> Result<()> {
        let (Buf::Bf16(qkv_s), Buf::Bf16(q_s)) = (&qkv.buf, &mut q.buf) else {
            return Err(Error::Device("rotary kernel works on bf16 activations".into()));
        };
        // Qwen3: normalise Q and K heads in place first; that kernel also adds the bias.
        let mut normed_qkv;
        let (qkv_s, bias) = match qk_norm {
            None => (qkv_s, bias),
            Some((qn, kn, eps)) => {
                normed_qkv = self.stream.clone_dtod(qkv_s).map_err(dev_err("device copy"))?;
                let (t, nq, nkv, hd) = (pass.rows as i32, heads.q_heads as i32, heads.kv_heads as i32, heads.head_dim as i32);
                let bias = bias.map_or(0, |b| self.ptr(&b.bf16));
                launch!(self, "qk_norm", cfg((pass.rows as u32, 1, 1), 256), &mut normed_qkv, &bias, &qn.bf16, &kn.bf16, &eps, &t, &nq, &nkv, &hd);
                (&normed_qkv, None)
            }
        };
        let (t, nq, nkv, hd) = (pass.rows as i32, heads.q_heads as i32, heads.kv_heads as i32, heads.head_dim as i32);
        let (k_cache, v_cache) = kv.layer_mut(layer);
        let bias = bias.map_or(0, |b| self.ptr(&b.bf16));
        let (positions, inv_freq, mscale, rot, kv_slot) = pass.rotary(heads);
        launch!(
            self,
            "rope_qkv",
            cfg((pass.rows as u32, 1, 1), 256),
            qkv_s, &bias, &positions, &inv_freq, &mscale, &rot, &kv_slot, q_s, k_cache, v_cache, &t, &nq, &nkv, &hd
        );
        Ok(())
    }

    fn attention_input(&self, pass: &CudaPass, x: &CudaAct, input: AttentionInput<'_, Self>, kv: &mut CudaKv, layer: usize, scratch: &mut CudaAct, q: &mut CudaAct) -> Result<()> {
        let Heads { q_heads, kv_heads, head_dim } = input.heads;
        let fused = self.gemv_rows(x.rows, input.qkv.cols).filter(|_| input.qk_norm.is_none() && input.qkv.rows == (q_heads + 2 * kv_heads) * head_dim);
        let (Some(t), Buf::Bf16(xs), Buf::Bf16(q_s)) = (fused, &x.buf, &mut q.buf) else {
            return super::unfused_attention_input(self, pass, x, input, kv, layer, scratch, q);
        };
        // One kernel: the projection, the bias, the rotation and the KV store (kernels/gemv_rope.cu).
        let name = ["gemv_rope_t1", "gemv_rope_t2", "gemv_rope_t3", "gemv_rope_t4"][t - 1];
        let (k_cache, v_cache) = kv.layer_mut(layer);
        let (nq, nkv, hd, k) = (q_heads as i32, kv_heads as i32, head_dim as i32, input.qkv.cols as i32);
        let bias = input.bias.map_or(0, |b| self.ptr(&b.bf16));
        let (positions, inv_freq, mscale, rot, kv_slot) = pass.rotary(input.heads);
        let grid = (input.qkv.rows / 2).div_ceil(GEMV_WARPS) as u32;
        launch!(
            self,
            name,
            cfg((grid, 1, 1), 32 * GEMV_WARPS as u32),
            &input.qkv.w, xs, &bias, &positions, &inv_freq, &mscale, &rot, &kv_slot, q_s, k_cache, v_cache, &nq, &nkv, &hd, &k
        );
        Ok(())
    }

    fn attention(&self, pass: &CudaPass, q: &CudaAct, kv: &CudaKv, layer: usize, heads: Heads, alibi: Option<&[f32]>, out: &mut CudaAct) -> Result<()> {

        let (Buf::Bf16(q_s), Buf::Bf16(o_s)) = (&q.buf, &mut out.buf) else {
            return Err(Error::Device("attention works on bf16 activations".into()));
        };
        let hd = heads.head_dim;
        if ![32, 48, 64, 80, 96, 128].contains(&hd) {
            return Err(Error::Device(format!("head dimension {hd} has no CUDA attention kernel (supported: 32, 48, 64, 80, 96, 128)")));
        }
        let l = layer % kv.stored_layers;
        let nseq = pass.plan.seqs.len() as i32;
        let (nq, nkv) = (heads.q_heads as i32, heads.kv_heads as i32);
        let scale = 1.0 / (hd as f32).sqrt();
        let alibi_ptr = match alibi {
            Some(slopes) => self.alibi_slopes(slopes)?,
            None => 0,
        };
        let (kv_start, kv_len) = (pass.at(pass.layout.kv_start), pass.at(pass.layout.kv_len));
        if pass.decode {
            let max_splits = pass.max_kv_len.div_ceil(256).max(1);
            // The partials are scratch (each split is written before it is read): reuse the
            // pass's buffers instead of allocating two per layer and step.
            let mut bufs = pass.bufs.borrow_mut();
            let bufs = &mut *bufs;
            grow(&self.stream, &mut bufs.part_o, pass.plan.seqs.len() * heads.q_heads * max_splits * hd)?;
            grow(&self.stream, &mut bufs.part_ml, pass.plan.seqs.len() * heads.q_heads * max_splits * 2)?;
            let (Some(part_o), Some(part_ml)) = (bufs.part_o.as_mut(), bufs.part_ml.as_mut()) else {
                return Err(Error::Device("attention partials were not allocated".into()));
            };
            let groups = (heads.q_heads / heads.kv_heads).div_ceil(8);
            let ms = max_splits as i32;
            let name = format!("attn_decode_hd{hd}");
            launch!(
                self,
                &name,
                cfg((max_splits as u32, (heads.kv_heads * groups) as u32, nseq as u32), 128),
                q_s, &kv.k[l], &kv.v[l], &mut *o_s, &mut *part_o, &mut *part_ml, &kv_start, &kv_len,
                &nseq, &nq, &nkv, &ms, &scale, &alibi_ptr
            );
            if max_splits > 1 {
                let hdi = hd as i32;
                launch!(self, "attn_decode_reduce", cfg((nq as u32, nseq as u32, 1), 128), &*part_o, &*part_ml, &kv_len, o_s, &nseq, &nq, &hdi, &ms);
            }
        } else {
            let name = format!("attn_prefill_hd{hd}");
            let cu_seqlens = pass.at(pass.layout.cu_seqlens);
            launch!(
                self,
                &name,
                cfg((pass.max_q_len.div_ceil(64) as u32, nq as u32, nseq as u32), 128),
                q_s, &kv.k[l], &kv.v[l], o_s, &cu_seqlens, &kv_start, &kv_len, &nseq, &nq, &nkv, &scale, &alibi_ptr
            );
        }
        Ok(())
    }

    fn activation(&self, kind: MlpKind, gate_up: &CudaAct, out: &mut CudaAct) -> Result<()> {
        if kind == MlpKind::GeluTanh {
            let (Buf::Bf16(x), Buf::Bf16(o)) = (&gate_up.buf, &mut out.buf) else {
                return Err(Error::Device("gelu works on bf16 activations".into()));
            };
            // The bias was added by the GEMM epilogue.
            let (t, i, null) = (out.rows as i32, out.cols as i32, 0u64);
            let grid = ((out.rows * out.cols).div_ceil(8 * 256)).clamp(1, 1 << 20) as u32;
            launch!(self, "gelu_tanh_bias", cfg((grid, 1, 1), 256), x, &null, o, &t, &i);
            return Ok(());
        }
        let (Buf::Bf16(gu), Buf::Bf16(o)) = (&gate_up.buf, &mut out.buf) else {
            return Err(Error::Device("swiglu works on bf16 activations".into()));
        };
        let (t, i) = (out.rows as i32, out.cols as i32);
        let grid = ((out.rows * out.cols).div_ceil(8 * 256)).clamp(1, 1 << 20) as u32;
        launch!(self, "swiglu", cfg((grid, 1, 1), 256), gu, o, &t, &i);
        Ok(())
    }

    fn mlp_input(&self, kind: MlpKind, x: &CudaAct, w: &CudaMatrix, b: Option<&CudaVector>, scratch: &mut CudaAct, out: &mut CudaAct) -> Result<()> {
        let fused = self.gemv_rows(x.rows, w.cols).filter(|_| kind == MlpKind::SwiGlu && w.rows.is_multiple_of(2));
        let (Some(t), Buf::Bf16(xs), Buf::Bf16(o)) = (fused, &x.buf, &mut out.buf) else {
            return super::unfused_mlp_input(self, kind, x, w, b, scratch, out);
        };
        // One kernel: both projections of each column and SwiGLU (kernels/gemv.cu).
        let name = ["gemv_swiglu_t1", "gemv_swiglu_t2", "gemv_swiglu_t3", "gemv_swiglu_t4"][t - 1];
        let (inter, k) = ((w.rows / 2) as i32, w.cols as i32);
        let bias = b.map_or(0, |b| self.ptr(&b.bf16));
        let grid = (w.rows / 2).div_ceil(GEMV_WARPS) as u32;
        launch!(self, name, cfg((grid, 1, 1), 32 * GEMV_WARPS as u32), &w.w, xs, &bias, o, &inter, &k);
        Ok(())
    }

    fn residual_step(
        &self,
        pass: &mut CudaPass,
        x: &mut CudaAct,
        norm: Norm<'_, CudaVector>,
        normed: &mut CudaAct,
        steer: Option<&PointSteering>,
        capture_residual: Option<usize>,
        capture_normed: Option<usize>,
        post_ln: bool,
    ) -> Result<()> {
        let (eps, kind, norm_bias, norm) = (norm.eps, norm.kind, norm.bias, norm.weight);
        let kernel = match kind {
            NormKind::Rms => "fused_residual_rms",
            NormKind::Layer => "fused_residual_ln",
        };
        let (Buf::F32(resid), Buf::Bf16(norm_out)) = (&mut x.buf, &mut normed.buf) else {
            return Err(Error::Device("residual step needs an f32 residual and a bf16 output".into()));
        };
        let (t, h) = (pass.rows as i32, pass.hidden as i32);
        let hidden = pass.hidden;
        let null = 0u64;
        let (steer_slot, steer_table) = pass.steer_args(steer)?;
        let residual_plane = capture_residual.map(|s| pass.slot_plane(s)).transpose()?;
        let normed_plane = capture_normed.map(|s| pass.slot_plane(s)).transpose()?;
        let (capture_row, capture_buf) = pass.capture_args(residual_plane);
        let bias = norm_bias.map_or(null, |b| self.ptr(&b.bf16));
        launch!(
            self,
            kernel,
            cfg((pass.rows as u32, 1, 1), row_block(hidden)),
            &mut *resid, &t, &h, &steer_slot, &steer_table, &capture_row, &capture_buf, &norm.bf16, &bias, &eps, &mut *norm_out, &null
        );
        let resid_ptr = self.ptr(resid);
        self.mean_capture(pass, resid_ptr, hidden, residual_plane)?;
        if let Some((plane, c)) = normed_plane {
            // The final norm in f32 of the captured rows only, into the plane (capture_norm.cu).
            let name = match kind {
                NormKind::Rms => "capture_norm_rms",
                NormKind::Layer => "capture_norm_ln",
            };
            let nseg = c.normed.count as i32;
            let [begin, end, dst, weight] = pass.segs(&c.normed);
            let bias = norm_bias.map_or(null, |b| self.ptr(&b.f32));
            launch!(
                self,
                name,
                cfg((c.normed.count as u32, 1, 1), row_block(hidden)),
                &*resid, &h, &begin, &end, &dst, &weight, &norm.f32, &bias, &eps, &plane, &nseg
            );
        }
        if residual_plane.is_some() || normed_plane.is_some() {
            // From here on the slots may be copied out while later layers run.
            let events = &mut pass.bufs.get_mut().capture_events;
            let slots = capture_residual.into_iter().chain(capture_normed);
            capture_copy::mark_written(&self.ctx, &self.stream, events, &mut pass.written, slots)?;
        }
        if post_ln {
            // The residual continues from the normed rows (as the model dtype holds them).
            let n = (pass.rows * pass.hidden) as i32;
            let grid = (pass.rows * pass.hidden).div_ceil(256).clamp(1, 1 << 20) as u32;
            launch!(self, "bf16_to_f32", cfg((grid, 1, 1), 256), &*norm_out, &mut *resid, &n);
        }
        Ok(())
    }

    fn branch_step(
        &self,
        pass: &mut CudaPass,
        branch: &mut CudaAct,
        steer: Option<&PointSteering>,
        capture: Option<usize>,
        add_to: Option<&mut CudaAct>,
    ) -> Result<()> {
        let (rows, width) = (branch.rows, branch.cols);
        let n = (rows * width) as i32;
        let grid = (rows * width).div_ceil(256).clamp(1, 1 << 20) as u32;
        let add_to = match add_to {
            None => 0u64,
            Some(CudaAct { buf: Buf::F32(x), .. }) => self.ptr_mut(x),
            Some(_) => return Err(Error::Device("a branch adds into the f32 residual".into())),
        };
        match &mut branch.buf {
            Buf::F32(rows_f32) => {
                let p = self.ptr_mut(rows_f32);
                self.branch_rows(pass, p, rows, width, steer, capture, add_to)
            }
            // hook_z: the heads' bf16 output, widened to f32 for steering and capture, and
            // narrowed back (round to nearest even) only when steered.
            Buf::Bf16(z) => {
                let mut wide = self.zeros::<f32>(rows * width)?;
                launch!(self, "bf16_to_f32", cfg((grid, 1, 1), 256), &*z, &mut wide, &n);
                let p = self.ptr_mut(&mut wide);
                self.branch_rows(pass, p, rows, width, steer, capture, add_to)?;
                if steer.is_some() {
                    launch!(self, "f32_to_bf16", cfg((grid, 1, 1), 256), &wide, &mut *z, &n);
                }
                Ok(())
            }
        }
    }

    fn gather_rows(&self, x: &CudaAct, rows: &[usize]) -> Result<CudaAct> {
        let Buf::Bf16(src) = &x.buf else { return Err(Error::Device("row gather works on bf16 activations".into())) };
        let mut dst = self.zeros::<u16>(rows.len() * x.cols)?;
        for (i, &r) in rows.iter().enumerate() {
            let from = src.slice(r * x.cols..(r + 1) * x.cols);
            let mut to = dst.slice_mut(i * x.cols..(i + 1) * x.cols);
            self.stream.memcpy_dtod(&from, &mut to).map_err(dev_err("device copy"))?;
        }
        Ok(CudaAct { buf: Buf::Bf16(dst), rows: rows.len(), cols: x.cols })
    }

    fn sample(&self, logits: &CudaAct, params: &[SampleParams]) -> Result<Vec<u32>> {
        let Buf::F32(l) = &logits.buf else { return Err(Error::Device("sampling reads f32 logits".into())) };
        let (rows, vocab) = (logits.rows, logits.cols);
        if params.len() != rows || rows == 0 {
            return Err(Error::input(format!("{} sampling rows for {rows} logits rows", params.len())));
        }
        // Poisoned: a row the kernel failed to write reads as out of range below.
        let mut ids = self.upload(&vec![-1i32; rows])?;
        let (v, n) = (vocab as i32, rows as i32);
        // Block size fixed: the kernel's sums (and so its picks) depend on it.
        let block = cfg((rows as u32, 1, 1), 1024);
        if params.iter().all(SampleParams::is_greedy) {
            launch!(self, "argmax_rows", block, l, &v, &mut ids, &n);
        } else {
            let mut table = Vec::with_capacity(3 * rows);
            table.extend(params.iter().map(|p| p.temperature));
            table.extend(params.iter().map(|p| p.top_p));
            table.extend(params.iter().map(|p| p.uniform));
            let table = self.upload(&table)?;
            let t = self.ptr(&table);
            let (top_p, uniform) = (t + 4 * rows as u64, t + 8 * rows as u64);
            // The probabilities overwrite the logits (the kernel allows it): they are not read again.
            let lp = self.ptr(l);
            launch!(self, "sample_rows", block, &lp, &v, &lp, &t, &top_p, &uniform, &mut ids, &n);
        }
        let host = self.stream.clone_dtoh(&ids).map_err(dev_err("device-to-host copy"))?;
        host.iter()
            .take(rows)
            .map(|&id| {
                u32::try_from(id).ok().filter(|&id| (id as usize) < vocab).ok_or_else(|| {
                    Error::Device(format!("sampling kernel returned token {id} for a vocabulary of {vocab}"))
                })
            })
            .collect()
    }

    fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(dev_err("synchronize"))
    }

    fn set_profiling(&self, on: bool) -> Result<()> {
        self.synchronize()?;
        let mut marks = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        *marks = EventMarks::default();
        if on {
            marks.record(&self.ctx, &self.stream, "start").map_err(dev_err("profile event"))?;
        }
        self.profiling.store(on, Ordering::Release);
        Ok(())
    }

    fn mark(&self, label: &'static str) {
        if !self.profiling.load(Ordering::Acquire) {
            return;
        }
        let mut marks = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = marks.record(&self.ctx, &self.stream, label) {
            marks.error.get_or_insert_with(|| format!("CUDA profile event: {e}"));
        }
    }

    fn take_profile(&self) -> Result<OpTimes> {
        self.synchronize()?;
        let mut marks = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        marks.resolve().map_err(dev_err("profile event"))?;
        match &marks.error {
            Some(e) => Err(Error::Device(e.clone())),
            None => Ok(marks.times.clone()),
        }
    }

    fn matrix_bytes(&self, m: &CudaMatrix) -> usize {
        m.rows * m.cols * 2
    }

    fn copy_bandwidth(&self, bytes: usize, reps: usize) -> Result<f64> {
        let src = self.zeros::<u8>(bytes)?;
        let mut dst = self.zeros::<u8>(bytes)?;
        self.stream.memcpy_dtod(&src, &mut dst).map_err(dev_err("device copy"))?;
        self.stream.synchronize().map_err(dev_err("synchronize"))?;
        let mut best = f64::MAX;
        for _ in 0..reps.max(1) {
            let t = std::time::Instant::now();
            self.stream.memcpy_dtod(&src, &mut dst).map_err(dev_err("device copy"))?;
            self.stream.synchronize().map_err(dev_err("synchronize"))?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        Ok(2.0 * bytes as f64 / best.max(1e-12))
    }
}
