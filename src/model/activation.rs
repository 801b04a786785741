//! Activation functions named as in transformers' `ACT2FN` (`hidden_act`, `projector_hidden_act`).

use candle_core::{Result, Tensor};

/// An element-wise activation, parsed from its transformers name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `gelu`: exact erf form (`nn.functional.gelu`).
    Gelu,
    /// `gelu_pytorch_tanh`, `gelu_new`, `gelu_fast`: the tanh approximation.
    GeluTanh,
    /// `quick_gelu`: `x * sigmoid(1.702 x)` (CLIP).
    QuickGelu,
    /// `silu` / `swish`.
    Silu,
    /// `relu`.
    Relu,
}

impl Activation {
    /// Parses a transformers activation name; `None` if unknown.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "gelu" => Self::Gelu,
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Self::GeluTanh,
            "quick_gelu" => Self::QuickGelu,
            "silu" | "swish" => Self::Silu,
            "relu" => Self::Relu,
            _ => return None,
        })
    }

    /// Applies the activation element-wise.
    pub fn apply(self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Gelu => xs.gelu_erf(),
            Self::GeluTanh => xs.gelu(),
            Self::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
            Self::Silu => xs.silu(),
            Self::Relu => xs.relu(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Values from torch 2.x (`torch.nn.functional.gelu`, `approximate="tanh"`, quick_gelu);
    /// 1e-6 absolute covers f32 rounding of the transcendental functions.
    #[test]
    fn matches_torch_values() -> Result<()> {
        let x = Tensor::new(&[-2.0f32, -0.5, 0.0, 1.0, 3.0], &Device::Cpu)?;
        let cases = [
            (
                "gelu",
                [-0.045500278f64, -0.15426877, 0.0, 0.84134471, 2.9959497],
            ),
            (
                "gelu_pytorch_tanh",
                [-0.045402288, -0.154286, 0.0, 0.84119201, 2.9963627],
            ),
            (
                "quick_gelu",
                [-0.064341374, -0.14961156, 0.0, 0.84579575, 2.9819288],
            ),
            (
                "silu",
                [-0.23840584, -0.18877034, 0.0, 0.7310586, 2.8577225],
            ),
        ];
        for (name, want) in cases {
            let act = Activation::from_name(name).expect("known activation");
            let got = act.apply(&x)?.to_vec1::<f32>()?;
            for (g, w) in got.iter().zip(want) {
                assert!((f64::from(*g) - w).abs() < 1e-6, "{name}: {g} vs {w}");
            }
        }
        assert_eq!(Activation::from_name("nope"), None);
        Ok(())
    }
}
