//! Ranking and selection over a vocabulary of scores for the sampler: the total rank order,
//! NaN/inf sanitizing, argmax, the best `count` ids, the top-p nucleus, and log-sum-exp. All
//! linear or expected-linear in the vocabulary size; nothing sorts the whole vocabulary.

use std::cmp::Ordering;

/// Nucleus search sorts its candidate range once it is this short.
const NUCLEUS_SORT_LEN: usize = 64;
/// Up to this many best ids are kept in a sorted buffer during one pass.
const TOP_BUFFER_MAX: usize = 64;

/// The last token, in rank order, of the nucleus of `pool`: the smallest best-first prefix whose
/// weight reaches `top_p` of the pool's. Quickselect on weight: split the candidate range at its
/// rank median, keep the half that holds the crossing point, sort only a short final range.
/// Expected O(|pool|).
pub(super) fn nucleus_last(scores: &[f32], weights: &[f32], pool: &mut [u32], top_p: f64) -> u32 {
    let mass = |ids: &[u32]| -> f64 { ids.iter().map(|&i| f64::from(weights[i as usize])).sum() };
    let by_rank = |a: &u32, b: &u32| rank_ids(scores, *a, *b);
    let target = top_p * mass(pool);
    // Invariant: pool[..lo] rank before pool[lo..hi], acc is their weight, and the crossing
    // point lies in pool[lo..hi].
    let (mut lo, mut hi, mut acc) = (0, pool.len(), 0.0f64);
    while hi - lo > NUCLEUS_SORT_LEN {
        let range = &mut pool[lo..hi];
        let mid = range.len() / 2;
        range.select_nth_unstable_by(mid, by_rank);
        let upper = mass(&range[..=mid]);
        if acc + upper >= target {
            hi = lo + mid + 1;
        } else {
            acc += upper;
            lo += mid + 1;
        }
    }
    let range = &mut pool[lo..hi];
    range.sort_unstable_by(by_rank);
    for &id in range.iter() {
        acc += f64::from(weights[id as usize]);
        if acc >= target {
            return id;
        }
    }
    // Summation order left the sum a hair under the target: the range's last token closes it.
    pool[hi - 1]
}

/// Leaves in `order` the `count` best of ids `0..n` under `score`, best first: one pass with a
/// short sorted buffer for small counts (top_logprobs ≤ 20, typical top_k), selection otherwise.
pub(super) fn best_ids(n: usize, count: usize, score: impl Fn(u32) -> f32, order: &mut Vec<u32>) {
    let count = count.min(n);
    let by_rank = |a: &u32, b: &u32| rank((score(*a), *a), (score(*b), *b));
    order.clear();
    if count <= TOP_BUFFER_MAX {
        for id in 0..n as u32 {
            let full = order.len() == count;
            if full
                && order
                    .last()
                    .is_none_or(|w| by_rank(&id, w) != Ordering::Less)
            {
                continue;
            }
            let at = order.partition_point(|o| by_rank(o, &id) == Ordering::Less);
            if full {
                order.pop();
            }
            order.insert(at, id);
        }
        return;
    }
    order.extend(0..n as u32);
    if count < n {
        order.select_nth_unstable_by(count - 1, by_rank);
        order.truncate(count);
    }
    order.sort_unstable_by(by_rank);
}

/// Total ranking order: higher score first, then lower id (`Less` = ranks before).
pub(super) fn rank(a: (f32, u32), b: (f32, u32)) -> Ordering {
    // Scores are sanitized (no NaN); partial_cmp keeps -0.0 == 0.0, as argmax's `>` does.
    let by_score = b.0.partial_cmp(&a.0).unwrap_or(Ordering::Equal);
    by_score.then(a.1.cmp(&b.1))
}

fn rank_ids(scores: &[f32], a: u32, b: u32) -> Ordering {
    rank((scores[a as usize], a), (scores[b as usize], b))
}

/// NaN → -inf, +inf → largest finite value; everything else unchanged.
pub(super) fn sanitize(x: f32) -> f32 {
    if x.is_nan() {
        f32::NEG_INFINITY
    } else {
        x.min(f32::MAX)
    }
}

/// Index of the largest finite-or-max value, lowest id on ties; None when all are -inf.
pub(super) fn argmax(scores: &[f32]) -> Option<u32> {
    let (mut best, mut best_score) = (None, f32::NEG_INFINITY);
    for (id, &s) in scores.iter().enumerate() {
        if s > best_score {
            (best, best_score) = (Some(id as u32), s);
        }
    }
    best
}

/// ln Σ exp(logit) over the sanitized logits, accumulated in f64.
pub(super) fn log_sum_exp(logits: &[f32]) -> f64 {
    let max = logits
        .iter()
        .map(|&x| sanitize(x))
        .fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    let sum: f64 = logits
        .iter()
        .map(|&x| f64::from((sanitize(x) - max).exp()))
        .sum();
    f64::from(max) + sum.ln()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn random_scores(rng: &mut StdRng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.gen_range(-8.0f32..8.0)).collect()
    }

    fn sorted_reference(scores: &[f32]) -> Vec<u32> {
        let mut sorted: Vec<u32> = (0..scores.len() as u32).collect();
        sorted.sort_by(|a, b| rank_ids(scores, *a, *b));
        sorted
    }

    #[test]
    fn nucleus_matches_full_sort_reference() {
        let mut rng = StdRng::seed_from_u64(11);
        for _ in 0..30 {
            let mut scores = random_scores(&mut rng, 20_000);
            scores[5] = scores[9]; // a tie, broken by id
            let top_p = rng.gen_range(0.0..1.0);
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let weights: Vec<f32> = scores.iter().map(|&s| (s - max).exp()).collect();
            let sorted = sorted_reference(&scores);
            let total: f64 = weights.iter().map(|&w| f64::from(w)).sum();
            let mut acc = 0.0;
            let expected = sorted.iter().copied().find(|&i| {
                acc += f64::from(weights[i as usize]);
                acc >= top_p * total
            });
            let mut pool: Vec<u32> = (0..scores.len() as u32).collect();
            // Summation order differs from the reference only at a rounding-level tie with the
            // target, which random `top_p` values do not hit.
            assert_eq!(
                Some(nucleus_last(&scores, &weights, &mut pool, top_p)),
                expected
            );
        }
    }

    #[test]
    fn best_ids_match_full_sort_for_both_paths() {
        let mut rng = StdRng::seed_from_u64(2);
        let mut scores = random_scores(&mut rng, 3000);
        scores[10] = scores[20];
        scores[30] = f32::NEG_INFINITY;
        let sorted = sorted_reference(&scores);
        let mut order = Vec::new();
        for count in [0, 1, 5, 20, 64, 65, 500, 3000, 5000] {
            best_ids(scores.len(), count, |id| scores[id as usize], &mut order);
            assert_eq!(order, sorted[..count.min(3000)], "count {count}");
        }
    }

    #[test]
    fn ties_and_special_values() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), Some(1));
        assert_eq!(argmax(&[-0.0, 0.0]), Some(0));
        assert_eq!(rank((-0.0, 0), (0.0, 1)), Ordering::Less);
        assert_eq!(argmax(&[f32::NEG_INFINITY; 3]), None);
        assert_eq!(sanitize(f32::NAN), f32::NEG_INFINITY);
        assert_eq!(sanitize(f32::INFINITY), f32::MAX);
        // ln(e^0 + e^0) = ln 2, exact to f64 rounding of the f32 inputs.
        assert!((log_sum_exp(&[0.0, 0.0, f32::NAN]) - 2f64.ln()).abs() < 1e-12);
        assert_eq!(log_sum_exp(&[f32::NAN]), f64::NEG_INFINITY);
    }
}
