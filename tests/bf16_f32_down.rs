//! The bf16 compute path with `RESID_CPU_BF16=f32-down` (down projections wholly in f32, the
//! earlier policy, kept for comparison): the same fixture tolerance and invariance checks as
//! `tests/bf16.rs`. Its own test binary, because the policy is read once per process.
mod common;

use common::bf16::*;
use resid::backend::cpu;

fn f32_down_policy() {
    // Every test sets the same value before it loads a model; the backend reads it once.
    std::env::set_var("RESID_CPU_BF16", "f32-down");
}

#[test]
fn f32_down_bf16_smollm2_135m_within_tolerance_of_hf() {
    f32_down_policy();
    check_fixture("smollm2-135m");
    if cpu::gemm::bf16_kernel().is_some() {
        assert!(cpu::kernel_description().contains("down projections f32"), "not the f32-down policy: {}", cpu::kernel_description());
    }
}

#[test]
fn f32_down_bf16_tiny_models_within_tolerance_of_hf() {
    f32_down_policy();
    check_every_fixture(&["smollm2-135m"]);
}

#[test]
fn f32_down_bf16_is_batch_and_thread_invariant() {
    f32_down_policy();
    check_batch_and_thread_invariance();
}
