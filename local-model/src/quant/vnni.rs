//! AVX-512 VNNI's `vpdpbusd` (64 byte products, unsigned by signed,
//! summed in fours and added to 16 integers, in one instruction), which
//! pulp 0.22 does not wrap: a token that proves the CPU has it, and the
//! instruction behind the token, as pulp wraps the others.
//!
//! The workspace's only `unsafe` block is here: the instruction is called
//! only through a [`Vnni`], which only [`Vnni::try_new`] makes, after the
//! CPU was found to have every feature it needs. (pulp's `simd_type!`
//! makes the token type and its `vectorize`, as it makes its own `V4`.)

use pulp::x86::V4;
use pulp::NullaryFnOnce;
use std::arch::x86_64::{__m512i, _mm512_dpbusd_epi32};

pulp::simd_type! {
    /// pulp's `V4` features and AVX-512 VNNI.
    struct V4VnniFeatures {
        sse: "sse",
        sse2: "sse2",
        fxsr: "fxsr",
        sse3: "sse3",
        ssse3: "ssse3",
        sse4_1: "sse4.1",
        sse4_2: "sse4.2",
        popcnt: "popcnt",
        avx: "avx",
        avx2: "avx2",
        bmi1: "bmi1",
        bmi2: "bmi2",
        fma: "fma",
        lzcnt: "lzcnt",
        avx512f: "avx512f",
        avx512bw: "avx512bw",
        avx512cd: "avx512cd",
        avx512dq: "avx512dq",
        avx512vl: "avx512vl",
        avx512vnni: "avx512vnni",
    }
}

/// Proof that this CPU has pulp's `V4` features and AVX-512 VNNI.
#[derive(Clone, Copy, Debug)]
pub struct Vnni {
    /// The `V4` operations (everything but `vpdpbusd`).
    pub v4: V4,
    features: V4VnniFeatures,
}

impl Vnni {
    /// The token, when the CPU has the features (checked once, then
    /// cached by pulp).
    pub fn try_new() -> Option<Self> {
        Some(Vnni {
            v4: V4::try_new()?,
            features: V4VnniFeatures::try_new()?,
        })
    }

    /// Runs `f` compiled with these features (its `call` must be
    /// `#[inline(always)]`, down to every [`Vnni::dpbusd`]).
    #[inline(always)]
    pub fn vectorize<F: NullaryFnOnce>(self, f: F) -> F::Output {
        self.features.vectorize(f)
    }

    /// Per 32-bit lane `i`: `acc[i] + sum over k < 4 of u[4i + k] * s[4i + k]`,
    /// `u`'s bytes unsigned, `s`'s signed (no saturation).
    #[inline(always)]
    #[allow(unsafe_code)]
    pub fn dpbusd(self, acc: __m512i, u: __m512i, s: __m512i) -> __m512i {
        // SAFETY: the intrinsic needs AVX-512F and AVX-512 VNNI (its
        // arguments are plain values, no pointers). `self` exists only if
        // `try_new` found both on this CPU (fields are private; the type
        // is `Copy` but not constructible elsewhere).
        unsafe { _mm512_dpbusd_epi32(acc, u, s) }
    }
}
