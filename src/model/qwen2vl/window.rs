//! Index bookkeeping of the vision tower: each patch's (h, w) coordinates in the processor's
//! merge-block order, and Qwen2.5-VL's window attention plan (transformers'
//! `get_vision_window_index`): merged units reordered window by window, the token ranges of the
//! windows, and the permutation that restores the original order after the merger.

/// (h, w) patch coordinates of a `[t, h, w]` grid in the order the processor lays out patch
/// rows: frame, then merge block (row-major), then patch within the block (row-major).
pub fn patch_positions([t, h, w]: [usize; 3], merge: usize) -> Vec<[usize; 2]> {
    let mut out = Vec::with_capacity(t * h * w);
    for _ in 0..t {
        for bh in 0..h / merge {
            for bw in 0..w / merge {
                for r in 0..merge {
                    for c in 0..merge {
                        out.push([bh * merge + r, bw * merge + c]);
                    }
                }
            }
        }
    }
    out
}

/// Window attention layout for one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowPlan {
    /// Token rows in window order: `token_order[i]` is the original row of row `i`.
    pub token_order: Vec<u32>,
    /// Each non-empty window's `[start, end)` rows in window order.
    pub windows: Vec<(usize, usize)>,
    /// For each merged unit in original order, its row in window order (`argsort(window_index)`).
    pub restore: Vec<u32>,
}

impl WindowPlan {
    /// `window` is the window side in merged units (`window_size / merge / patch_size`, > 0).
    pub fn new([t, h, w]: [usize; 3], merge: usize, window: usize) -> Self {
        let (gh, gw, unit) = (h / merge, w / merge, merge * merge);
        // transformers pads by a whole window when the grid already divides (empty windows).
        let (nwh, nww) = (
            (gh + window - gh % window) / window,
            (gw + window - gw % window) / window,
        );
        let mut units = Vec::with_capacity(t * gh * gw);
        let mut windows = Vec::new();
        for f in 0..t {
            for wy in 0..nwh {
                for wx in 0..nww {
                    let before = units.len();
                    for y in wy * window..((wy + 1) * window).min(gh) {
                        for x in wx * window..((wx + 1) * window).min(gw) {
                            units.push(f * gh * gw + y * gw + x);
                        }
                    }
                    if units.len() > before {
                        windows.push((before * unit, units.len() * unit));
                    }
                }
            }
        }
        let token_order = units
            .iter()
            .flat_map(|&u| (0..unit).map(move |r| (u * unit + r) as u32))
            .collect();
        let mut restore = vec![0u32; units.len()];
        for (row, &u) in units.iter().enumerate() {
            restore[u] = row as u32;
        }
        Self {
            token_order,
            windows,
            restore,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_follow_merge_blocks() {
        let got = patch_positions([1, 2, 4], 2);
        let want = [
            [0, 0],
            [0, 1],
            [1, 0],
            [1, 1],
            [0, 2],
            [0, 3],
            [1, 2],
            [1, 3],
        ];
        assert_eq!(got, want);
    }

    /// A 3x5 merged grid with 2x2 windows, checked against transformers 5.24
    /// `get_vision_window_index(tensor([[1, 6, 10]]), 2, 56, 14)` (window 56 / 2 / 14 = 2):
    /// window_index [0,1,5,6, 2,3,7,8, 4,9, 10,11, 12,13, 14], cu_window_seqlens
    /// [0,16,32,40,48,56,60] (units of merge² = 4 rows).
    #[test]
    fn windows_match_transformers() {
        let plan = WindowPlan::new([1, 6, 10], 2, 2);
        let units: Vec<u32> = plan.token_order.iter().step_by(4).map(|r| r / 4).collect();
        assert_eq!(
            units,
            vec![0, 1, 5, 6, 2, 3, 7, 8, 4, 9, 10, 11, 12, 13, 14]
        );
        let ends: Vec<usize> = plan.windows.iter().map(|w| w.1).collect();
        assert_eq!(ends, vec![16, 32, 40, 48, 56, 60]);
        assert_eq!(plan.restore[5], 2);
        assert_eq!(plan.token_order[..5], [0, 1, 2, 3, 4]);
    }
}
