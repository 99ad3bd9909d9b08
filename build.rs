//! Embeds the CUDA kernels: each `kernels/*.cu` with its `#include "x.cuh"` headers inlined, so
//! NVRTC can compile it at run time with no include paths and no CUDA toolkit headers.
use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn inline(path: &Path, seen: &mut HashSet<PathBuf>, out: &mut String) {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    for line in text.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("#include \"") {
            let name = rest.trim_end_matches('"');
            let header = path.parent().unwrap_or(Path::new(".")).join(name);
            if seen.insert(header.clone()) {
                inline(&header, seen, out);
            }
            continue;
        }
        if t == "#pragma once" {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
}

fn main() {
    println!("cargo:rerun-if-changed=kernels");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let mut names: Vec<PathBuf> = std::fs::read_dir("kernels")
        .map(|d| d.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "cu")).collect())
        .unwrap_or_default();
    names.sort();
    let mut table = String::from("/// (kernel file stem, self-contained CUDA source)\npub const KERNEL_SOURCES: &[(&str, &str)] = &[\n");
    for path in &names {
        println!("cargo:rerun-if-changed={}", path.display());
        let stem = path.file_stem().and_then(|s| s.to_str()).expect("kernel file name");
        let mut src = String::new();
        inline(path, &mut HashSet::new(), &mut src);
        let dest = out_dir.join(format!("{stem}.cu"));
        std::fs::write(&dest, src).expect("write inlined kernel");
        writeln!(table, "    ({stem:?}, include_str!(concat!(env!(\"OUT_DIR\"), \"/{stem}.cu\"))),").unwrap();
    }
    table.push_str("];\n");
    std::fs::write(out_dir.join("kernel_sources.rs"), table).expect("write kernel table");
}
