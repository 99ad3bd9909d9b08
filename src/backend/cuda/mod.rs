//! The CUDA backend: hand-written kernels (kernels/*.cu, compiled by NVRTC) for everything
//! but the GEMMs, which go through cuBLASLt. Weights live on the device in bf16; the residual
//! stream stays f32; sub-layer activations are bf16.
//!
//! Libraries are loaded dynamically. Everything that can be missing (driver, cuBLASLt, NVRTC,
//! a visible GPU) is checked before first use and reported as a device error, never a panic.
pub mod gemm;
pub mod modules;

use super::{ActKind, Backend, CaptureLayout, Heads, Norm};
use crate::model::arch::{MlpKind, NormKind};
use crate::engine::capture::{CapturePosition, CaptureSink, Captured};
use crate::engine::plan::BatchPlan;
use crate::engine::steer::{PointSteering, SteerOp};
use crate::error::{Error, Result};
use crate::model::weights::F32Data;
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use std::collections::HashMap;
use std::sync::Arc;

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
}

pub struct CudaMatrix {
    w: CudaSlice<u16>,
    rows: usize,
    cols: usize,
}

pub struct CudaVector {
    bf16: CudaSlice<u16>,
    f32: CudaSlice<f32>,
    host: Vec<f32>,
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

struct DeviceCapture {
    position: CapturePosition,
    slots: usize,
    rows: usize,
    /// `[slots, rows, hidden]`.
    buf: CudaSlice<f32>,
    /// Per packed row: its capture row (last token of a sequence for `last`, itself for `all`), or -1.
    capture_row: CudaSlice<i32>,
    /// Mean segments: one per sequence.
    seg_begin: CudaSlice<i32>,
    seg_end: CudaSlice<i32>,
    seg_dst: CudaSlice<i32>,
    seg_weight: CudaSlice<f32>,
    /// Raw residual rows of every token for a capture of the normed point (index L), normalised
    /// on the host in f32 at the end of the pass: `[rows_of_pass, hidden]`, slot, norm weight, eps.
    normed: Option<HostNorm>,
}

/// Raw residual rows kept for a capture of the normed point, normalised on the host in f32.
struct HostNorm {
    raw: CudaSlice<f32>,
    slot: usize,
    kind: NormKind,
    weight: Vec<f32>,
    bias: Option<Vec<f32>>,
    eps: f32,
}

pub struct CudaPass {
    plan: BatchPlan,
    rows: usize,
    hidden: usize,
    positions: CudaSlice<i32>,
    kv_slot: CudaSlice<i32>,
    cu_seqlens: CudaSlice<i32>,
    kv_start: CudaSlice<i32>,
    kv_len: CudaSlice<i32>,
    /// Rotary inverse frequencies; None for ALiBi models (the kernel then rotates nothing).
    inv_freq: Option<CudaSlice<f32>>,
    max_q_len: usize,
    max_kv_len: usize,
    decode: bool,
    capture: Option<DeviceCapture>,
}

fn to_bf16_bits(data: &[f32]) -> Vec<u16> {
    data.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect()
}

fn i32s(v: impl IntoIterator<Item = usize>) -> Vec<i32> {
    v.into_iter().map(|x| x as i32).collect()
}

/// Threads per block for row kernels: a function of the hidden size only, so that results do
/// not depend on the batch.
fn row_block(h: usize) -> u32 {
    (h.div_ceil(8).div_ceil(32) * 32).clamp(128, 1024) as u32
}

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
        let arch = modules::virtual_arch(info.compute_capability)?;
        let functions = modules::load_all(&ctx, arch)?;
        let stream = ctx.default_stream();
        let workspace = stream.alloc_zeros::<u8>(gemm::Lt::workspace_bytes()).map_err(dev_err("workspace allocation"))?;
        let ws_ptr = {
            let (p, _sync) = workspace.device_ptr(&stream);
            p
        };
        let blas = gemm::Lt::new(ws_ptr)?;
        Ok(CudaBackend { ctx, stream, functions, blas, _workspace: workspace, info })
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

    fn zeros<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        self.stream.alloc_zeros::<T>(n.max(1)).map_err(|e| Error::Device(format!("CUDA allocation of {n} elements: {e}")))
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

macro_rules! launch {
    ($be:expr, $name:expr, $cfg:expr, $($arg:expr),* $(,)?) => {{
        let f = $be.f($name)?;
        let mut b = $be.stream.launch_builder(f);
        $( b.arg($arg); )*
        // SAFETY: argument lists follow the kernel contracts in kernels/*.cu.
        unsafe { b.launch($cfg) }.map_err(|e| Error::Device(format!("kernel {} launch: {e}", $name)))?;
    }};
}

impl Backend for CudaBackend {
    type Matrix = CudaMatrix;
    type Vector = CudaVector;
    type Act = CudaAct;
    type Kv = CudaKv;
    type Pass = CudaPass;

    fn name(&self) -> String {
        let (a, b) = self.info.compute_capability;
        format!("cuda:{} ({}, sm_{a}{b}, {:.1} GiB)", self.info.ordinal, self.info.name, self.info.total_memory as f64 / (1u64 << 30) as f64)
    }

    fn matrix(&self, data: F32Data, rows: usize, cols: usize) -> Result<CudaMatrix> {
        Ok(CudaMatrix { w: self.upload(&to_bf16_bits(&data))?, rows, cols })
    }

    fn vector(&self, data: F32Data) -> Result<CudaVector> {
        Ok(CudaVector { bf16: self.upload(&to_bf16_bits(&data))?, f32: self.upload(&data[..])?, host: data.to_vec() })
    }

    fn act(&self, rows: usize, cols: usize, kind: ActKind) -> Result<CudaAct> {
        let buf = match kind {
            ActKind::Residual | ActKind::Logits => Buf::F32(self.zeros(rows * cols)?),
            ActKind::Hidden => Buf::Bf16(self.zeros(rows * cols)?),
        };
        Ok(CudaAct { buf, rows, cols })
    }

    fn kv(&self, stored_layers: usize, slots: usize, kv_dim: usize) -> Result<CudaKv> {
        let n = stored_layers.max(1);
        let mut k = Vec::with_capacity(n);
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            k.push(self.zeros::<u16>(slots * kv_dim)?);
            v.push(self.zeros::<u16>(slots * kv_dim)?);
        }
        Ok(CudaKv { stored_layers: n, k, v })
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

    fn begin_pass(&self, plan: &BatchPlan, inv_freq: &[f32], capture: Option<CaptureLayout>, hidden: usize) -> Result<CudaPass> {
        let rows = plan.rows();
        let nseq = plan.seqs.len();
        let kv_slot: Vec<i32> = (0..rows).map(|r| (plan.seqs[plan.row_seq[r] as usize].kv_start + plan.positions[r] as usize) as i32).collect();
        let mut cu = vec![0i32];
        for s in &plan.seqs {
            cu.push((s.start + s.len) as i32);
        }
        let capture = match capture {
            None => None,
            Some(c) => {
                let cap_rows = if c.position == CapturePosition::All { rows } else { nseq };
                let mut row_map = vec![-1i32; rows];
                for (i, s) in plan.seqs.iter().enumerate() {
                    match c.position {
                        CapturePosition::Last => row_map[s.start + s.len - 1] = i as i32,
                        CapturePosition::All => s.rows().for_each(|r| row_map[r] = r as i32),
                        CapturePosition::Mean => {}
                    }
                }
                Some(DeviceCapture {
                    position: c.position,
                    slots: c.slots,
                    rows: cap_rows,
                    buf: self.zeros(c.slots * cap_rows * hidden)?,
                    capture_row: self.upload(&row_map)?,
                    seg_begin: self.upload(&i32s(plan.seqs.iter().map(|s| s.start)))?,
                    seg_end: self.upload(&i32s(plan.seqs.iter().map(|s| s.start + s.len)))?,
                    seg_dst: self.upload(&i32s(0..nseq))?,
                    seg_weight: self.upload(&plan.seqs.iter().map(|s| 1.0 / s.len as f32).collect::<Vec<_>>())?,
                    normed: None,
                })
            }
        };
        Ok(CudaPass {
            rows,
            hidden,
            positions: self.upload(&i32s(plan.positions.iter().map(|&p| p as usize)))?,
            kv_slot: self.upload(&kv_slot)?,
            cu_seqlens: self.upload(&cu)?,
            kv_start: self.upload(&i32s(plan.seqs.iter().map(|s| s.kv_start)))?,
            kv_len: self.upload(&i32s(plan.seqs.iter().map(|s| s.past + s.len)))?,
            // An empty table must reach the kernel as null: a non-null pointer means "rotate".
            inv_freq: if inv_freq.is_empty() { None } else { Some(self.upload(inv_freq)?) },
            max_q_len: plan.seqs.iter().map(|s| s.len).max().unwrap_or(0),
            max_kv_len: plan.seqs.iter().map(|s| s.past + s.len).max().unwrap_or(0),
            decode: plan.seqs.iter().all(|s| s.len == 1),
            capture,
            plan: plan.clone(),
        })
    }

    fn end_pass(&self, pass: CudaPass, sink: Option<&mut CaptureSink>) -> Result<()> {
        let (Some(cap), Some(sink)) = (pass.capture, sink) else { return Ok(()) };
        let h = pass.hidden;
        let data = self.stream.clone_dtoh(&cap.buf).map_err(dev_err("capture copy"))?;
        let mut local = Captured::new(cap.rows, cap.slots, h, Vec::new());
        for slot in 0..cap.slots {
            for r in 0..cap.rows {
                let src = &data[(slot * cap.rows + r) * h..(slot * cap.rows + r + 1) * h];
                local.row_mut(r, slot).copy_from_slice(src);
            }
        }
        if let Some(n) = &cap.normed {
            let raw = self.stream.clone_dtoh(&n.raw).map_err(dev_err("capture copy"))?;
            let mut normed = vec![0f32; pass.rows * h];
            for (src, dst) in raw.chunks_exact(h).zip(normed.chunks_exact_mut(h)).take(pass.rows) {
                match n.kind {
                    NormKind::Rms => crate::backend::cpu::norm::rms_norm_row(src, &n.weight, n.eps, dst),
                    NormKind::Layer => crate::backend::cpu::norm::layer_norm_row(src, &n.weight, n.bias.as_deref(), n.eps, dst),
                }
            }
            crate::backend::cpu::residual::capture_rows(&normed, h, &pass.plan, &mut local, cap.position, n.slot);
        }
        sink.absorb(&pass.plan, &local);
        Ok(())
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
                let null = 0u64;
                let f = self.f("embedding_gather_ln")?;
                let mut b = self.stream.launch_builder(f);
                b.arg(&table.w).arg(&ids_dev).arg(resid).arg(&t).arg(&h).arg(&vocab).arg(&scale).arg(&n.weight.bf16);
                match n.bias {
                    Some(bias) => b.arg(&bias.bf16),
                    None => b.arg(&null),
                };
                b.arg(&n.eps);
                // SAFETY: argument list follows kernels/embedding.cu.
                unsafe { b.launch(cfg((ids.len() as u32, 1, 1), row_block(table.cols))) }
                    .map_err(|e| Error::Device(format!("kernel embedding_gather_ln launch: {e}")))?;
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
                let null = 0u64;
                let f = self.f("qk_norm")?;
                let mut b = self.stream.launch_builder(f);
                b.arg(&mut normed_qkv);
                match bias {
                    Some(bias) => b.arg(&bias.bf16),
                    None => b.arg(&null),
                };
                b.arg(&qn.bf16).arg(&kn.bf16).arg(&eps).arg(&t).arg(&nq).arg(&nkv).arg(&hd);
                // SAFETY: argument list follows kernels/qk_norm.cu.
                unsafe { b.launch(cfg((pass.rows as u32, 1, 1), 256)) }.map_err(|e| Error::Device(format!("kernel qk_norm launch: {e}")))?;
                (&normed_qkv, None)
            }
        };
        let l = layer % kv.stored_layers;
        let null = 0u64;
        let (mscale, rot, t, nq, nkv, hd) = (1.0f32, heads.head_dim as i32, pass.rows as i32, heads.q_heads as i32, heads.kv_heads as i32, heads.head_dim as i32);
        let (k_cache, v_cache) = (&mut kv.k[l], &mut kv.v[l]);
        let f = self.f("rope_qkv")?;
        let mut b = self.stream.launch_builder(f);
        b.arg(qkv_s);
        match bias {
            Some(bias) => b.arg(&bias.bf16),
            None => b.arg(&null),
        };
        b.arg(&pass.positions);
        match &pass.inv_freq {
            Some(f) => b.arg(f),
            None => b.arg(&null),
        };
        b.arg(&mscale).arg(&rot).arg(&pass.kv_slot).arg(q_s).arg(k_cache).arg(v_cache);
        b.arg(&t).arg(&nq).arg(&nkv).arg(&hd);
        // SAFETY: argument list follows kernels/rope.cu.
        unsafe { b.launch(cfg((pass.rows as u32, 1, 1), 256)) }.map_err(|e| Error::Device(format!("kernel rope_qkv launch: {e}")))?;
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
        let slopes = alibi.map(|a| self.upload(a)).transpose()?;
        let alibi_ptr: u64 = slopes.as_ref().map_or(0, |s| self.ptr(s));
        if pass.decode {
            let max_splits = pass.max_kv_len.div_ceil(256).max(1);
            let mut part_o = self.zeros::<f32>(pass.plan.seqs.len() * heads.q_heads * max_splits * hd)?;
            let mut part_ml = self.zeros::<f32>(pass.plan.seqs.len() * heads.q_heads * max_splits * 2)?;
            let groups = (heads.q_heads / heads.kv_heads).div_ceil(8);
            let ms = max_splits as i32;
            let name = format!("attn_decode_hd{hd}");
            launch!(
                self,
                &name,
                cfg((max_splits as u32, (heads.kv_heads * groups) as u32, nseq as u32), 128),
                q_s, &kv.k[l], &kv.v[l], &mut *o_s, &mut part_o, &mut part_ml, &pass.kv_start, &pass.kv_len,
                &nseq, &nq, &nkv, &ms, &scale, &alibi_ptr
            );
            if max_splits > 1 {
                let hdi = hd as i32;
                launch!(self, "attn_decode_reduce", cfg((nq as u32, nseq as u32, 1), 128), &part_o, &part_ml, &pass.kv_len, o_s, &nseq, &nq, &hdi, &ms);
            }
        } else {
            let name = format!("attn_prefill_hd{hd}");
            launch!(
                self,
                &name,
                cfg((pass.max_q_len.div_ceil(64) as u32, nq as u32, nseq as u32), 128),
                q_s, &kv.k[l], &kv.v[l], o_s, &pass.cu_seqlens, &pass.kv_start, &pass.kv_len, &nseq, &nq, &nkv, &scale, &alibi_ptr
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
        let null = 0u64;
        let steer_dev = match steer {
            None => None,
            Some(st) => {
                let mut vecs = Vec::with_capacity(st.slots.len() * pass.hidden);
                for s in &st.slots {
                    vecs.extend_from_slice(s.vector);
                }
                let modes: Vec<i32> = st.slots.iter().map(|s| (s.op == SteerOp::SignAware) as i32 | ((s.preserve_norm as i32) << 1)).collect();
                let coefs: Vec<f32> = st.slots.iter().map(|s| s.coef).collect();
                Some((self.upload(&st.row_slot)?, self.upload(&vecs)?, self.upload(&coefs)?, self.upload(&modes)?))
            }
        };
        let hidden = pass.hidden;
        let cap = pass.capture.as_mut();
        // Last/all captures go through the kernel's capture_row map into this slot's plane.
        let mut plane_offset = None;
        if let (Some(slot), Some(c)) = (capture_residual, cap.as_ref()) {
            if c.position != CapturePosition::Mean {
                plane_offset = Some(slot * c.rows * hidden);
            }
        }
        {
            let f = self.f(kernel)?;
            let mut b = self.stream.launch_builder(f);
            b.arg(&mut *resid).arg(&t).arg(&h);
            match &steer_dev {
                Some((slots, vecs, coefs, modes)) => b.arg(slots).arg(vecs).arg(coefs).arg(modes),
                None => b.arg(&null).arg(&null).arg(&null).arg(&null),
            };
            let mut view;
            match (plane_offset, pass.capture.as_mut()) {
                (Some(off), Some(c)) => {
                    view = c.buf.slice_mut(off..);
                    b.arg(&c.capture_row).arg(&mut view);
                }
                _ => {
                    b.arg(&null).arg(&null);
                }
            }
            b.arg(&norm.bf16);
            match norm_bias {
                Some(bias) => b.arg(&bias.bf16),
                None => b.arg(&null),
            };
            b.arg(&eps).arg(&mut *norm_out);
            // SAFETY: argument list follows kernels/fused_residual.cu.
            unsafe { b.launch(cfg((pass.rows as u32, 1, 1), row_block(pass.hidden))) }
                .map_err(|e| Error::Device(format!("kernel {kernel} launch: {e}")))?;
        }
        if let (Some(slot), Some(c)) = (capture_residual, pass.capture.as_mut()) {
            if c.position == CapturePosition::Mean {
                let nseg = pass.plan.seqs.len() as i32;
                let accumulate = 0i32;
                let mut view = c.buf.slice_mut(slot * c.rows * hidden..);
                launch!(
                    self,
                    "mean_capture",
                    cfg((hidden.div_ceil(256) as u32, nseg as u32, 1), 256),
                    &*resid, &h, &c.seg_begin, &c.seg_end, &c.seg_dst, &c.seg_weight, &mut view, &accumulate, &nseg
                );
            }
        }
        if let (Some(slot), Some(c)) = (capture_normed, pass.capture.as_mut()) {
            // Keep every raw row; the host applies the final norm in f32 at the end of the pass.
            let mut raw = self.zeros::<f32>(pass.rows * hidden)?;
            self.stream.memcpy_dtod(&*resid, &mut raw).map_err(dev_err("device copy"))?;
            c.normed = Some(HostNorm { raw, slot, kind, weight: norm.host.clone(), bias: norm_bias.map(|b| b.host.clone()), eps });
        }
        if post_ln {
            // The residual continues from the normed rows (as the model dtype holds them).
            let n = (pass.rows * pass.hidden) as i32;
            let grid = (pass.rows * pass.hidden).div_ceil(256).clamp(1, 1 << 20) as u32;
            launch!(self, "bf16_to_f32", cfg((grid, 1, 1), 256), &*norm_out, &mut *resid, &n);
        }
        Ok(())
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

    fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(dev_err("synchronize"))
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
