//! The Q8_0 product against a scalar reference (bit for bit) and candle's Q8_0 kernels.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

use super::*;

/// Input rows a test covers: every pass width and remainder, and a prefill-sized count.
const ROW_COUNTS: [usize; 10] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 37];

/// (n, k) shapes: a panel cut short, one block, several panels.
const SHAPES: [(usize, usize); 4] = [(37, 64), (16, 32), (5, 96), (70, 160)];

fn arena() -> HugeArena {
    HugeArena::default()
}

/// The product as the kernel defines it, one output at a time: the exact integer sum of each
/// block, scaled by (weight scale x input scale) and added in f32 in block order.
fn reference(w: &Q8Matrix, x: &[f32], m: usize) -> Vec<f32> {
    let (n, k) = (w.n, w.k);
    let rows = Rows::new(x);
    let blocks = k / BLOCK;
    let mut out = vec![0f32; m * n];
    for i in 0..m {
        for r in 0..n {
            let (lines, scales) = w
                .with_lines(|all| {
                    let (lines, scales) = w.panel(all, r / PANEL);
                    Ok((lines.to_vec(), scales.to_vec()))
                })
                .expect("the lines are on the CPU");
            let lane = r % PANEL;
            let mut acc = 0f32;
            for b in 0..blocks {
                let dot: i32 = (0..BLOCK)
                    .map(|j| {
                        let stored = lines[b * GROUPS + j / 4].0[lane * 4 + j % 4];
                        let weight = (stored ^ 0x80) as i8 as i32;
                        weight * rows.q[i * k + b * BLOCK + j] as i32
                    })
                    .sum();
                let scale = scales[b * PANEL + lane].to_f32() * rows.d[i * blocks + b];
                acc = (dot as f32).mul_add(scale, acc);
            }
            out[i * n + r] = acc;
        }
    }
    out
}

#[test]
fn matches_the_scalar_reference_bit_for_bit() -> Result<()> {
    if !Q8Matrix::supported() {
        eprintln!("skipped: this CPU has no AVX-512 VNNI (q8_0 uses candle's kernels there)");
        return Ok(());
    }
    let dev = Device::Cpu;
    for (n, k) in SHAPES {
        let w = Q8Matrix::quantize(&Tensor::randn(0f32, 1.0, (n, k), &dev)?, &mut arena())?;
        for m in ROW_COUNTS {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
            let got = w.forward(&x)?;
            assert_eq!(got.dims(), [m, n]);
            let got: Vec<u32> = got
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .map(|v| v.to_bits())
                .collect();
            let want: Vec<u32> = reference(&w, &x.flatten_all()?.to_vec1()?, m)
                .iter()
                .map(|v| v.to_bits())
                .collect();
            assert_eq!(got, want, "n {n} k {k} m {m}");
        }
    }
    Ok(())
}

/// Against candle's Q8_0 product (`QMatMul`), which rounds weights and inputs the same way:
/// the integer block sums are equal, only the order of the f32 additions of the scaled sums
/// differs (candle keeps 8 partial sums), a few ulps of the largest partial sum. 1e-5 of the
/// output's largest magnitude is ~100 ulps; one weight or input rounded differently would move
/// an output by ~1% of a block's contribution, about 1e-3 of that magnitude.
#[test]
fn matches_candles_q8_0_product() -> Result<()> {
    if !Q8Matrix::supported() {
        eprintln!("skipped: this CPU has no AVX-512 VNNI");
        return Ok(());
    }
    let dev = Device::Cpu;
    for (n, k) in SHAPES {
        let dense = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
        let ours = Q8Matrix::quantize(&dense, &mut arena())?;
        let candle = QMatMul::from_qtensor(QTensor::quantize(&dense, GgmlDType::Q8_0)?)?;
        for m in ROW_COUNTS {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
            let want = candle.forward(&x)?;
            let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
            let diff = (ours.forward(&x)? - &want)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(diff <= 1e-5 * scale, "n {n} k {k} m {m}: {diff} of {scale}");
        }
    }
    Ok(())
}

#[test]
fn declines_an_input_dimension_off_the_blocks() -> Result<()> {
    let w = Tensor::zeros((4, 48), candle_core::DType::F32, &Device::Cpu)?;
    assert!(Q8Matrix::quantize(&w, &mut arena()).is_err());
    Ok(())
}

#[test]
fn bytes_count_the_padded_panel() -> Result<()> {
    let zeros = Tensor::zeros((17, 64), candle_core::DType::F32, &Device::Cpu)?;
    let w = Q8Matrix::quantize(&zeros, &mut arena())?;
    // 2 panels x 2 blocks x (8 lines of 64 bytes + 16 f16 scales).
    assert_eq!(w.bytes(), 2 * 2 * (8 * 64 + 16 * 2));
    Ok(())
}

/// The libm-free rounding gives `f32::round`'s saturated value for halves, values near them,
/// the ends of the i8 range and beyond, and NaN.
#[test]
fn rounding_is_f32_round() {
    let mut values = vec![
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        3e9,
        -3e9,
        0.0,
        -0.0,
    ];
    for i in -1300..=1300 {
        let v = i as f32 / 10.0;
        for u in [v, v + 0.05, v - 0.05] {
            values.extend([
                u,
                f32::from_bits(u.to_bits().wrapping_add(1)),
                f32::from_bits(u.to_bits().wrapping_sub(1)),
            ]);
        }
    }
    values.extend([
        0.5,
        -0.5,
        0.49999997,
        -0.49999997,
        127.5,
        -128.5,
        126.5,
        -127.5,
    ]);
    for v in values {
        assert_eq!(super::round_to_i8(v), v.round() as i8, "{v}");
    }
}
