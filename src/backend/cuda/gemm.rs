//! GEMMs through cuBLASLt: bf16 inputs, f32 accumulation, f32 or bf16 output, optional bias
//! epilogue, and `beta = 1` to accumulate straight into the residual stream. The algorithm is
//! chosen once per shape and cached.
use crate::error::{Error, Result};
use cudarc::cublaslt::{result as lt, sys};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Mutex;

const WORKSPACE_BYTES: usize = 32 << 20;
const OP_N: i32 = 0;
const OP_T: i32 = 1;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum OutType {
    F32,
    Bf16,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    n: usize,
    rows: usize,
    k: usize,
    out: OutType,
    bias: bool,
}

struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    d: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

// SAFETY: descriptors are plain handles; every use is serialised by the plans mutex.
unsafe impl Send for Plan {}

impl Plan {
    /// Frees the descriptors (host objects: a matmul already queued with them is unaffected).
    unsafe fn destroy(self) {
        let _ = lt::destroy_matrix_layout(self.a);
        let _ = lt::destroy_matrix_layout(self.b);
        let _ = lt::destroy_matrix_layout(self.d);
        let _ = lt::destroy_matmul_desc(self.desc);
    }
}

/// Plans kept at most: every distinct row count of a packed batch is a new shape, and a long
/// run with varied batches would otherwise keep adding descriptors.
const MAX_PLANS: usize = 512;

/// A map that drops its least recently used entry beyond `cap` entries, handing it back.
struct Lru<K, V> {
    cap: usize,
    clock: u64,
    entries: HashMap<K, (V, u64)>,
}

impl<K: Copy + Eq + std::hash::Hash, V> Lru<K, V> {
    fn new(cap: usize) -> Self {
        Lru { cap: cap.max(1), clock: 0, entries: HashMap::new() }
    }

    /// The entry for `key`, made by `make` when missing; an entry evicted to make room is
    /// passed to `evicted`.
    fn get_or_insert(&mut self, key: K, make: impl FnOnce() -> Result<V>, evicted: impl FnOnce(V)) -> Result<&V> {
        self.clock += 1;
        let now = self.clock;
        if !self.entries.contains_key(&key) {
            let value = make()?;
            if self.entries.len() >= self.cap {
                let oldest = self.entries.iter().min_by_key(|(_, (_, used))| *used).map(|(k, _)| *k);
                if let Some((old, _)) = oldest.and_then(|k| self.entries.remove(&k)) {
                    evicted(old);
                }
            }
            self.entries.insert(key, (value, now));
        }
        let entry = self.entries.get_mut(&key).ok_or_else(|| Error::Device("cuBLASLt plan cache lost an entry".into()))?;
        entry.1 = now;
        Ok(&entry.0)
    }

    fn drain(&mut self) -> impl Iterator<Item = V> + '_ {
        self.entries.drain().map(|(_, (v, _))| v)
    }
}

pub struct Lt {
    handle: sys::cublasLtHandle_t,
    workspace: u64,
    plans: Mutex<Lru<Key, Plan>>,
}

impl Drop for Lt {
    fn drop(&mut self) {
        let plans = self.plans.get_mut().unwrap_or_else(|p| p.into_inner());
        // SAFETY: nothing uses the descriptors or the handle after the backend is dropped.
        unsafe {
            for plan in plans.drain() {
                plan.destroy();
            }
            let _ = lt::destroy_handle(self.handle);
        }
    }
}

// SAFETY: the handle is used only under the plans mutex.
unsafe impl Send for Lt {}
unsafe impl Sync for Lt {}

fn blas_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Device(format!("cuBLASLt {what} failed: {e:?}"))
}

fn dtype(o: OutType) -> sys::cudaDataType {
    match o {
        OutType::F32 => sys::cudaDataType::CUDA_R_32F,
        OutType::Bf16 => sys::cudaDataType::CUDA_R_16BF,
    }
}

impl Lt {
    pub fn new(workspace: u64) -> Result<Self> {
        let handle = lt::create_handle().map_err(|e| blas_err("handle creation", e))?;
        Ok(Lt { handle, workspace, plans: Mutex::new(Lru::new(MAX_PLANS)) })
    }

    pub fn workspace_bytes() -> usize {
        WORKSPACE_BYTES
    }

    unsafe fn plan(&self, key: Key) -> Result<Plan> {
        let desc = lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType::CUDA_R_32F)
            .map_err(|e| blas_err("matmul descriptor", e))?;
        let set = |attr, v: &i32| {
            lt::set_matmul_desc_attribute(desc, attr, v as *const i32 as *const c_void, 4).map_err(|e| blas_err("descriptor attribute", e))
        };
        set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, &OP_T)?;
        set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, &OP_N)?;
        if key.bias {
            let epi = sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS as i32;
            set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE, &epi)?;
            let bt = dtype(key.out) as i32;
            set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bt)?;
        }
        // Row-major W [n, k] is column-major [k, n]: op(A) = Aᵀ. Row-major X [rows, k] is
        // column-major [k, rows]. D row-major [rows, n] is column-major [n, rows].
        let (n, rows, k) = (key.n as u64, key.rows as u64, key.k as u64);
        let a = lt::create_matrix_layout(sys::cudaDataType::CUDA_R_16BF, k, n, k as i64).map_err(|e| blas_err("layout", e))?;
        let b = lt::create_matrix_layout(sys::cudaDataType::CUDA_R_16BF, k, rows, k as i64).map_err(|e| blas_err("layout", e))?;
        let d = lt::create_matrix_layout(dtype(key.out), n, rows, n as i64).map_err(|e| blas_err("layout", e))?;
        let pref = lt::create_matmul_pref().map_err(|e| blas_err("preference", e))?;
        let ws = WORKSPACE_BYTES as u64;
        lt::set_matmul_pref_attribute(
            pref,
            sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            &ws as *const u64 as *const c_void,
            8,
        )
        .map_err(|e| blas_err("preference attribute", e))?;
        let heuristic = lt::get_matmul_algo_heuristic(self.handle, desc, a, b, d, d, pref)
            .map_err(|e| blas_err(&format!("algorithm search for [{rows}x{k}]·[{n}x{k}]ᵀ"), e))?;
        let _ = lt::destroy_matmul_pref(pref);
        Ok(Plan { desc, a, b, d, algo: heuristic.algo })
    }

    /// `D[rows, n] = X[rows, k]·W[n, k]ᵀ (+ bias) (+ D when accumulate)`, all device pointers.
    // `stream` is a handle handed to cuBLASLt, never dereferenced here.
    #[allow(clippy::too_many_arguments, clippy::not_unsafe_ptr_arg_deref)]
    pub fn matmul(
        &self,
        stream: sys::cudaStream_t,
        w: u64,
        x: u64,
        d: u64,
        bias: Option<u64>,
        n: usize,
        rows: usize,
        k: usize,
        out: OutType,
        accumulate: bool,
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        let key = Key { n, rows, k, out, bias: bias.is_some() };
        let mut plans = self.plans.lock().map_err(|_| Error::Device("cuBLASLt plan cache poisoned".into()))?;
        // SAFETY: descriptor creation on a live handle; an evicted plan is no longer used.
        let plan = plans.get_or_insert(key, || unsafe { self.plan(key) }, |old| unsafe { old.destroy() })?;
        let (alpha, beta) = (1.0f32, if accumulate { 1.0f32 } else { 0.0f32 });
        // SAFETY: pointers come from live device allocations of the sizes the layouts describe.
        unsafe {
            if let Some(b) = bias {
                lt::set_matmul_desc_attribute(
                    plan.desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    &b as *const u64 as *const c_void,
                    8,
                )
                .map_err(|e| blas_err("bias pointer", e))?;
            }
            lt::matmul(
                self.handle,
                plan.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                w as *const c_void,
                plan.a,
                x as *const c_void,
                plan.b,
                d as *const c_void,
                plan.d,
                d as *mut c_void,
                plan.d,
                &plan.algo,
                self.workspace as *mut c_void,
                WORKSPACE_BYTES,
                stream,
            )
            .map_err(|e| blas_err(&format!("matmul [{rows}x{k}]·[{n}x{k}]ᵀ"), e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Lru;

    #[test]
    fn lru_evicts_the_least_recently_used_entry() {
        let mut lru: Lru<u32, String> = Lru::new(2);
        let mut gone = Vec::new();
        lru.get_or_insert(1, || Ok("a".into()), |v| gone.push(v)).unwrap();
        lru.get_or_insert(2, || Ok("b".into()), |v| gone.push(v)).unwrap();
        // Using 1 again makes 2 the oldest.
        assert_eq!(lru.get_or_insert(1, || panic!("cached"), |v| gone.push(v)).unwrap(), "a");
        lru.get_or_insert(3, || Ok("c".into()), |v| gone.push(v)).unwrap();
        assert_eq!(gone, ["b"]);
        assert_eq!(lru.entries.len(), 2);
        // A failed make leaves the map as it was.
        assert!(lru.get_or_insert(4, || Err(crate::error::Error::Device("no".into())), |v| gone.push(v)).is_err());
        assert_eq!(lru.entries.len(), 2);
        assert_eq!(lru.drain().count(), 2);
    }
}
