//! The bf16 compute path of the CPU backend (AMX `tdpbf16ps` tiles or AVX512-BF16 `vdpbf16ps`,
//! f32 accumulation) with
//! its default policy (bf16 down projections with outlier inputs and attention-sink rows in
//! f32): parity with the Hugging Face f32 fixtures within its own tolerance (see
//! `common/bf16.rs`), and the same batch and thread invariance as the f32 path. Its own test
//! binary, because the compute type is chosen per process.
mod common;

use common::bf16::*;
use resid::backend::cpu;

#[test]
fn bf16_smollm2_135m_within_tolerance_of_hf() {
    check_fixture("smollm2-135m");
    if cpu::gemm::bf16_kernel().is_some() {
        assert!(cpu::kernel_description().contains("sink rows"), "not the default policy: {}", cpu::kernel_description());
    }
}

#[test]
fn bf16_tiny_models_within_tolerance_of_hf() {
    check_every_fixture(&["smollm2-135m"]);
}

#[test]
fn bf16_is_batch_and_thread_invariant() {
    check_batch_and_thread_invariance();
}
