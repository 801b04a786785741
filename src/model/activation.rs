//! Activation functions named as in transformers' `ACT2FN` (`hidden_act`, `projector_hidden_act`).
//!
//! On the CPU in f32, the sigmoid-shaped ones run here, spread over candle's thread pool: the
//! image profile (bench/README.md) found candle's tanh-form GELU on one thread taking a fifth of
//! a SigLIP tile's encoding. `0.5 x (1 + tanh(z)) = x sigmoid(2z)`, so every one of them is
//! `x / (1 + exp(-a(x) x))`: one `exp` per value.

use candle_core::{CpuStorage, CustomOp1, DType, InplaceOp1, Layout, Result, Shape, Tensor};

/// Values per work item of the parallel map.
const CHUNK: usize = 4096;

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

    /// Applies the activation element-wise to `xs`, which no other tensor may share (a
    /// projection's fresh output): on the CPU in f32 in its own storage, with the bits of
    /// [`Activation::apply`]. A SigLIP tile's fc1 output is 12 MiB; a new one for the result
    /// was zero-filled on the engine thread and page-faulted each layer.
    pub fn apply_owned(self, xs: Tensor) -> Result<Tensor> {
        let f32_cpu = xs.device().is_cpu() && xs.dtype() == DType::F32;
        match SigmoidForm::of(self) {
            Some(op) if f32_cpu && xs.is_contiguous() => {
                xs.inplace_op1(&op)?;
                Ok(xs)
            }
            _ => self.apply(&xs),
        }
    }

    /// Applies the activation element-wise.
    pub fn apply(self, xs: &Tensor) -> Result<Tensor> {
        if xs.device().is_cpu() && xs.dtype() == DType::F32 {
            if let Some(op) = SigmoidForm::of(self) {
                return xs.contiguous()?.apply_op1_no_bwd(&op);
            }
        }
        match self {
            Self::Gelu => xs.gelu_erf(),
            Self::GeluTanh => xs.gelu(),
            Self::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
            Self::Silu => xs.silu(),
            Self::Relu => xs.relu(),
        }
    }
}

/// `act(gate) * up` of a gated MLP whose two halves are stacked: `gate_up` (T, 2I), gate
/// first -> (T, I). On the CPU in f32 it is one pass (the engine thread's share of a decoding
/// step: two narrows, the activation and the product were four candle ops a layer), with the
/// bits of the separate ops: the same activation, then one f32 product.
pub fn gated(act: Activation, gate_up: &Tensor) -> Result<Tensor> {
    let i = gate_up.dim(1)? / 2;
    if gate_up.device().is_cpu() && gate_up.dtype() == DType::F32 {
        if let Some(form) = SigmoidForm::of(act) {
            return gate_up.contiguous()?.apply_op1_no_bwd(&Gated(form));
        }
    }
    let gate = gate_up.narrow(1, 0, i)?;
    act.apply(&gate)? * gate_up.narrow(1, i, i)?
}

/// [`gated`]'s CPU op.
struct Gated(SigmoidForm);

impl CustomOp1 for Gated {
    fn name(&self) -> &'static str {
        "gated-activation"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let xs = super::par::operand::<f32>(s, l)?;
        let (t, width) = l.shape().dims2()?;
        let i = width / 2;
        let mut out = vec![0f32; t * i];
        // Whole rows per item, about CHUNK values.
        let rows = (CHUNK / i.max(1)).max(1);
        super::par::for_each_chunk_mut(&mut out, rows * i, |item, piece| {
            for (r, o) in piece.chunks_mut(i).enumerate() {
                let row = &xs[(item * rows + r) * width..][..width];
                let (gate, up) = row.split_at(i);
                self.0.apply(gate, o);
                for (o, &u) in o.iter_mut().zip(up) {
                    *o *= u;
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((t, i))))
    }
}

/// `x sigmoid(slope(x) x)`, with `slope(x) = a + b x^2`.
#[derive(Debug, Clone, Copy)]
struct SigmoidForm {
    a: f32,
    b: f32,
}

impl SigmoidForm {
    fn of(act: Activation) -> Option<Self> {
        // tanh-GELU: 2 sqrt(2 / pi) (x + 0.044715 x^3).
        let k = (2.0 * (2.0 / std::f64::consts::PI).sqrt()) as f32;
        Some(match act {
            Activation::GeluTanh => Self {
                a: k,
                b: k * 0.044715,
            },
            Activation::QuickGelu => Self { a: 1.702, b: 0.0 },
            Activation::Silu => Self { a: 1.0, b: 0.0 },
            Activation::Gelu | Activation::Relu => return None,
        })
    }
}

impl CustomOp1 for SigmoidForm {
    fn name(&self) -> &'static str {
        "sigmoid-form-activation"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("activation: input not contiguous")
        };
        let xs = &s.as_slice::<f32>()?[start..end];
        let mut out = vec![0f32; xs.len()];
        super::par::for_each_chunk_mut(&mut out, CHUNK, |i, piece| {
            self.apply(&xs[i * CHUNK..i * CHUNK + piece.len()], piece);
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

impl InplaceOp1 for SigmoidForm {
    fn name(&self) -> &'static str {
        "sigmoid-form-activation-in-place"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("activation: input not contiguous")
        };
        let CpuStorage::F32(values) = s else {
            candle_core::bail!("activation: in place on f32 only")
        };
        super::par::for_each_chunk_mut(&mut values[start..end], CHUNK, |_, piece| {
            // The piece's inputs, read while it is overwritten.
            let mut xs = [0f32; CHUNK];
            let xs = &mut xs[..piece.len()];
            xs.copy_from_slice(piece);
            self.apply(xs, piece);
        });
        Ok(())
    }
}

impl SigmoidForm {
    /// `out = x / (1 + e^(-(a + b x^2) x))`, the exponentials a slice at a time.
    fn apply(&self, xs: &[f32], out: &mut [f32]) {
        for (o, &x) in out.iter_mut().zip(xs) {
            *o = -(self.a + self.b * x * x) * x;
        }
        super::fast_exp::exp_in_place(out);
        for (o, &x) in out.iter_mut().zip(xs) {
            *o = x / (1.0 + *o);
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
            // The f16 path is candle's own op, the f32 one ours: same values to f16 rounding.
            let half = act.apply(&x.to_dtype(DType::F16)?)?.to_dtype(DType::F32)?;
            for (h, w) in half.to_vec1::<f32>()?.iter().zip(want) {
                assert!(
                    (f64::from(*h) - w).abs() < 4e-3 * w.abs().max(1.0),
                    "{name} f16: {h}"
                );
            }
        }
        assert_eq!(Activation::from_name("nope"), None);
        Ok(())
    }

    /// The fused `act(gate) * up` gives the bits of the separate ops, for one row and for rows
    /// spanning several work items, and the f16 fallback agrees to f16 rounding.
    #[test]
    fn gated_is_the_activation_times_up() -> Result<()> {
        for (t, i) in [(1, 5), (3, 1536), (7, 700)] {
            let gate_up = Tensor::randn(0f32, 2.0, (t, 2 * i), &Device::Cpu)?;
            let want =
                (Activation::Silu.apply(&gate_up.narrow(1, 0, i)?)? * gate_up.narrow(1, i, i)?)?;
            let got = gated(Activation::Silu, &gate_up)?;
            assert_eq!(got.dims(), [t, i]);
            let bits = crate::model::f32_bits;
            assert_eq!(bits(&got)?, bits(&want)?, "t {t} i {i}");
            let half = gated(Activation::Silu, &gate_up.to_dtype(DType::F16)?)?;
            let diff = (half.to_dtype(DType::F32)? - &want)?.abs()?;
            let bound = (want.abs()? * 4e-3)?.maximum(4e-3)?;
            let over = diff
                .gt(&bound)?
                .to_dtype(DType::F32)?
                .sum_all()?
                .to_scalar::<f32>()?;
            assert_eq!(over, 0.0, "f16 t {t} i {i}");
        }
        Ok(())
    }

    /// Many values (several work items) and the tails: large |x| must give x and 0, not NaN.
    /// Against the textbook tanh form in f64; 1e-6 relative covers one f32 exp and division.
    #[test]
    fn parallel_sigmoid_form_matches_the_formulas() -> Result<()> {
        let n = 3 * CHUNK + 17;
        let xs: Vec<f32> = (0..n).map(|i| (i as f32 - n as f32 / 2.0) * 0.01).collect();
        let x = Tensor::new(xs.as_slice(), &Device::Cpu)?.reshape((n, 1))?;
        let gelu = |v: f64| {
            0.5 * v
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v.powi(3))).tanh())
        };
        let silu = |v: f64| v / (1.0 + (-v).exp());
        for (act, f) in [
            (Activation::GeluTanh, &gelu as &dyn Fn(f64) -> f64),
            (Activation::Silu, &silu),
        ] {
            let got = act.apply(&x)?.flatten_all()?.to_vec1::<f32>()?;
            for (g, v) in got.iter().zip(&xs) {
                let want = f(f64::from(*v));
                assert!(
                    (f64::from(*g) - want).abs() <= 1e-6 * want.abs().max(1.0),
                    "{act:?}({v}): {g} vs {want}"
                );
            }
        }
        // In place: the same bits, over several work items and a tail.
        for act in [
            Activation::GeluTanh,
            Activation::QuickGelu,
            Activation::Silu,
        ] {
            let want = act.apply(&x)?;
            let got = act.apply_owned(x.copy()?)?;
            let bits = crate::model::f32_bits;
            assert_eq!(bits(&got)?, bits(&want)?, "{act:?} in place");
        }
        let ends = Tensor::new(&[-1e4f32, 1e4, -90.0, 90.0], &Device::Cpu)?;
        let got = Activation::GeluTanh.apply(&ends)?.to_vec1::<f32>()?;
        assert_eq!(got, vec![-0.0, 1e4, -0.0, 90.0]);
        Ok(())
    }
}
