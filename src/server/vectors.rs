//! The server's named steering vectors: loaded from `--vectors DIR` at start, uploaded,
//! listed and removed while it runs. Each is a `[L+1, hidden]` directions table, exactly what
//! `resid generate --steer FILE` reads.
use super::api::{check_vector_name, ApiError, ApiResult};
use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

pub struct StoredVector {
    /// `[L+1, hidden]`; empty for a file that holds only points inside blocks.
    pub table: Arc<Vec<f32>>,
    /// Vectors for points inside blocks, by point name (`blocks.3.hook_mlp_out`).
    pub points: crate::io::SteeringTensors,
    /// `safetensors` or `gguf`.
    pub format: &'static str,
    pub source: String,
}

impl StoredVector {
    /// Hidden-state indices whose row is not all zero.
    pub fn nonzero_layers(&self, hidden: usize) -> Vec<usize> {
        self.table.chunks(hidden.max(1)).enumerate().filter(|(_, row)| row.iter().any(|&v| v != 0.0)).map(|(l, _)| l).collect()
    }
}

pub struct VectorStore {
    num_layers: usize,
    hidden: usize,
    map: RwLock<BTreeMap<String, Arc<StoredVector>>>,
}

/// GGUF files start with these bytes; anything else is read as safetensors.
fn is_gguf(bytes: &[u8]) -> bool {
    bytes.starts_with(b"GGUF")
}

impl VectorStore {
    pub fn new(num_layers: usize, hidden: usize) -> Self {
        VectorStore { num_layers, hidden, map: RwLock::new(BTreeMap::new()) }
    }

    /// Reads a vector file's bytes (safetensors `directions` or a GGUF control vector).
    pub fn parse(&self, bytes: &[u8], source: &str) -> Result<StoredVector> {
        if is_gguf(bytes) {
            let t = crate::repe::gguf::parse_control_vector(bytes, Path::new(source), self.num_layers, self.hidden)?;
            return Ok(StoredVector { table: Arc::new(t.data), points: Default::default(), format: "gguf", source: source.to_string() });
        }
        let mut t = crate::io::SteeringTensors::parse(bytes, source, self.num_layers, self.hidden)?;
        let table = Arc::new(t.directions.take().unwrap_or_default());
        Ok(StoredVector { table, points: t, format: "safetensors", source: source.to_string() })
    }

    /// Loads every `.safetensors` and `.gguf` file of `dir`, each named by its file stem.
    pub fn load_dir(&self, dir: &Path) -> Result<usize> {
        let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
        let mut paths: Vec<std::path::PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("safetensors") || e.eq_ignore_ascii_case("gguf")))
            .collect();
        paths.sort();
        let mut n = 0;
        for path in paths {
            let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
            check_vector_name(&name).map_err(|e| Error::input(format!("{}: {}", path.display(), e.message)))?;
            let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
            let v = self.parse(&bytes, &path.display().to_string())?;
            let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
            if map.contains_key(&name) {
                return Err(Error::input(format!("{}: a vector named `{name}` was already loaded from another file", path.display())));
            }
            map.insert(name, Arc::new(v));
            n += 1;
        }
        Ok(n)
    }

    pub fn get(&self, name: &str, param: &str) -> ApiResult<Arc<StoredVector>> {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| ApiError::not_found(param, format!("no steering vector named `{name}` (GET /v1/steering/vectors lists them)"), "vector_not_found"))
    }

    pub fn insert(&self, name: &str, bytes: &[u8], replace: bool) -> ApiResult<Arc<StoredVector>> {
        check_vector_name(name)?;
        let v = self.parse(bytes, &format!("upload `{name}`")).map_err(|e| ApiError::invalid("body", e.to_string()))?;
        let v = Arc::new(v);
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        if !replace && map.contains_key(name) {
            return Err(ApiError { status: 409, message: format!("a vector named `{name}` exists; DELETE it first or upload with ?replace=true"), kind: "invalid_request_error", param: Some("name".into()), code: Some("vector_exists") });
        }
        map.insert(name.to_string(), v.clone());
        Ok(v)
    }

    pub fn remove(&self, name: &str) -> ApiResult<()> {
        match self.map.write().unwrap_or_else(|p| p.into_inner()).remove(name) {
            Some(_) => Ok(()),
            None => Err(ApiError::not_found("name", format!("no steering vector named `{name}`"), "vector_not_found")),
        }
    }

    pub fn list(&self) -> Vec<(String, Arc<StoredVector>)> {
        self.map.read().unwrap_or_else(|p| p.into_inner()).iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    pub fn describe(&self, name: &str, v: &StoredVector) -> serde_json::Value {
        serde_json::json!({
            "id": name,
            "object": "steering_vector",
            "format": v.format,
            "source": v.source,
            "rows": self.num_layers + 1,
            "hidden_size": self.hidden,
            "nonzero_layers": v.nonzero_layers(self.hidden),
            "points": v.points.points.keys().collect::<Vec<_>>(),
        })
    }
}
