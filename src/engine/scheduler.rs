//! The scheduling decision of one engine step, as pure data.
//!
//! Each sequence has tokens in the KV cache (`cached`) and tokens known but not yet cached
//! (`uncached`: its prompt before prefill, one generated token while decoding, prompt and
//! generated tokens after a preemption). A step feeds every running sequence a chunk of its
//! uncached tokens within the token budget (`max_batched_tokens`), oldest first; a chunk leaves
//! one token of budget to each running sequence behind it, so a long prompt is prefilled in
//! chunks beside the decodes instead of stalling them.
//!
//! KV memory comes in blocks. When a running sequence's chunk needs more blocks than are free,
//! the newest running sequences are preempted (the blocks no other sequence shares are freed;
//! they wait again at the head of the queue and are recomputed from their tokens later), the
//! sequence itself last. Waiting sequences are admitted first come, first served, only while
//! seats (`max_num_seqs`), budget and free blocks for their whole uncached tokens allow, and
//! never in a step that preempted: the queue is never skipped, so nobody starves. A waiting
//! sequence whose prompt starts with cached blocks (prefix caching) counts them as `cached`: it
//! needs blocks only for the rest, plus the cached-free ones it takes back (`revives`).
//!
//! Images are encoded in the step that admits their sequence. Admission also stops at the
//! encoder budget (`max_encoder_tokens`, image tokens per step), though the first sequence
//! with images in a step always goes: where the encoder already fills the machine, encoding
//! four images together makes all four wait as long as the last, one a step answers the first
//! after one encoder pass.

/// Limits that shape each step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Most sequences in one batch (running plus newly admitted).
    pub max_num_seqs: usize,
    /// Most tokens (prefill chunks plus decodes) in one forward pass.
    pub max_batched_tokens: usize,
    /// Most image tokens whose vision encoder runs in one step (beyond the first sequence's).
    pub max_encoder_tokens: usize,
}

/// A sequence as the scheduler sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqState {
    /// Tokens in the KV cache; its blocks hold exactly these.
    pub cached: usize,
    /// Tokens known and not yet in the cache.
    pub uncached: usize,
    /// Running: blocks its preemption frees (those no other sequence shares).
    pub frees: usize,
    /// Waiting: cached-free blocks its cached prefix takes off the free count when admitted.
    pub revives: usize,
    /// Waiting: image tokens whose encoder must run before its first chunk (0: none, or done).
    pub encoder: usize,
}

/// The KV block pool right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blocks {
    pub block_size: usize,
    pub free: usize,
    pub total: usize,
}

impl Blocks {
    fn of(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size.max(1))
    }

    /// New blocks `s` needs to cache `n` more tokens.
    fn growth(&self, s: SeqState, n: usize) -> usize {
        self.of(s.cached + n) - self.of(s.cached)
    }
}

/// What to run this step.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Running sequences to preempt (indices into `running`), newest first.
    pub preempt: Vec<usize>,
    /// Tokens each running sequence feeds this step (aligned with `running`; 0: none).
    pub tokens: Vec<usize>,
    /// First-chunk sizes of the sequences admitted from the front of the waiting queue.
    pub admit: Vec<usize>,
    /// The head of the queue needs more blocks than the whole pool: it can never run.
    pub reject_head: bool,
}

impl Plan {
    /// True when no sequence runs this step.
    pub fn is_idle(&self) -> bool {
        self.admit.is_empty() && self.tokens.iter().all(|&n| n == 0)
    }
}

/// Plans one step from the running sequences (oldest first), the waiting queue (in order) and
/// the block pool.
pub fn plan(
    cfg: &SchedulerConfig,
    blocks: Blocks,
    running: &[SeqState],
    waiting: &[SeqState],
) -> Plan {
    let mut plan = Plan {
        tokens: vec![0; running.len()],
        ..Plan::default()
    };
    let mut budget = cfg.max_batched_tokens;
    let mut free = blocks.free;
    // Running sequences not preempted, oldest first; the first `i` are scheduled.
    let mut live: Vec<usize> = (0..running.len()).collect();
    let mut i = 0;
    while i < live.len() {
        let s = running[live[i]];
        let behind = live.len() - i - 1;
        let n = s
            .uncached
            .min(budget.saturating_sub(behind).max(1))
            .min(budget);
        if n == 0 {
            break;
        }
        let need = blocks.growth(s, n);
        while need > free {
            // The newest unscheduled sequence makes room; at worst the sequence itself.
            let Some(victim) = live.pop() else { break };
            plan.preempt.push(victim);
            free += running[victim].frees;
            if live.len() == i {
                break;
            }
        }
        if live.len() == i {
            break;
        }
        free -= need;
        budget -= n;
        plan.tokens[live[i]] = n;
        i += 1;
    }
    if plan.preempt.is_empty() {
        admit(cfg, blocks, &mut plan, live.len(), waiting, (budget, free));
    }
    plan
}

/// Admits waiting sequences in order while seats, budget and blocks allow.
fn admit(
    cfg: &SchedulerConfig,
    blocks: Blocks,
    plan: &mut Plan,
    running: usize,
    waiting: &[SeqState],
    (mut budget, mut free): (usize, usize),
) {
    let mut seats = cfg.max_num_seqs.saturating_sub(running);
    let mut encoder = cfg.max_encoder_tokens;
    let mut encoding = false;
    for (j, &w) in waiting.iter().enumerate() {
        let whole = blocks.of(w.cached + w.uncached);
        if j == 0 && whole > blocks.total {
            plan.reject_head = true;
            return;
        }
        // The whole prompt's blocks are set aside, not just the first chunk's.
        let need = blocks.growth(w, w.uncached) + w.revives;
        if seats == 0 || budget == 0 || need > free {
            return;
        }
        if w.encoder > 0 {
            if encoding && w.encoder > encoder {
                return;
            }
            encoder = encoder.saturating_sub(w.encoder);
            encoding = true;
        }
        let n = w.uncached.min(budget);
        free -= need;
        budget -= n;
        seats -= 1;
        plan.admit.push(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: SchedulerConfig = SchedulerConfig {
        max_num_seqs: 4,
        max_batched_tokens: 100,
        max_encoder_tokens: 1000,
    };

    /// Plenty of blocks of 4 tokens.
    const ROOMY: Blocks = pool(1000, 1000);

    /// A pool of blocks of 4 tokens.
    const fn pool(free: usize, total: usize) -> Blocks {
        Blocks {
            block_size: 4,
            free,
            total,
        }
    }

    fn prompt(n: usize) -> SeqState {
        SeqState {
            cached: 0,
            uncached: n,
            frees: 0,
            revives: 0,
            encoder: 0,
        }
    }

    /// Running with `cached` tokens in blocks of its own (of 4 tokens).
    fn decoding(cached: usize) -> SeqState {
        SeqState {
            cached,
            uncached: 1,
            frees: cached.div_ceil(4),
            revives: 0,
            encoder: 0,
        }
    }

    #[test]
    fn idle_plans_nothing() {
        assert!(plan(&CFG, ROOMY, &[], &[]).is_idle());
    }

    #[test]
    fn running_sequences_always_decode() {
        let p = plan(&CFG, ROOMY, &[decoding(5), decoding(9), decoding(1)], &[]);
        assert_eq!(p.tokens, vec![1, 1, 1]);
        assert!(p.admit.is_empty() && p.preempt.is_empty());
    }

    #[test]
    fn admits_up_to_the_seat_limit() {
        assert_eq!(plan(&CFG, ROOMY, &[], &[prompt(1); 5]).admit.len(), 4);
        let two = [decoding(3), decoding(3)];
        assert_eq!(plan(&CFG, ROOMY, &two, &[prompt(1); 3]).admit.len(), 2);
        assert!(plan(&CFG, ROOMY, &[decoding(3); 4], &[prompt(1)])
            .admit
            .is_empty());
    }

    #[test]
    fn token_budget_counts_decodes_and_chunks() {
        // 2 decode tokens leave 98: 60 goes in whole, 40 gets the 38 left as its first chunk.
        let p = plan(&CFG, ROOMY, &[decoding(4); 2], &[prompt(60), prompt(40)]);
        assert_eq!(p.admit, vec![60, 38]);
        assert_eq!(
            plan(&CFG, ROOMY, &[], &[prompt(50), prompt(50)]).admit,
            vec![50, 50]
        );
    }

    #[test]
    fn long_prompts_are_prefilled_in_chunks_beside_decodes() {
        // A 250-token prompt alone: 100, then 100, then 50.
        assert_eq!(plan(&CFG, ROOMY, &[], &[prompt(250)]).admit, vec![100]);
        let mid = SeqState {
            cached: 100,
            uncached: 150,
            frees: 25,
            revives: 0,
            encoder: 0,
        };
        // Mid-prefill and oldest, it leaves one token to each decode behind it.
        let p = plan(&CFG, ROOMY, &[mid, decoding(7), decoding(8)], &[]);
        assert_eq!(p.tokens, vec![98, 1, 1]);
        // Behind a decode it takes what the decode left.
        let p = plan(&CFG, ROOMY, &[decoding(7), mid], &[prompt(5)]);
        assert_eq!((p.tokens, p.admit), (vec![1, 99], vec![]));
    }

    #[test]
    fn first_come_first_served_without_skipping() {
        // The head needs 25 blocks, 20 are free: the short prompt behind it waits its turn.
        let tight = pool(20, 40);
        let p = plan(&CFG, tight, &[], &[prompt(100), prompt(1)]);
        assert!(p.admit.is_empty() && !p.reject_head);
    }

    #[test]
    fn admission_needs_the_whole_prompt_in_free_blocks() {
        let b = pool(10, 10);
        // 40 tokens fit 10 blocks exactly; the second prompt finds none left.
        assert_eq!(plan(&CFG, b, &[], &[prompt(40), prompt(1)]).admit, vec![40]);
        assert!(
            plan(&CFG, b, &[], &[prompt(41)]).reject_head,
            "can never fit"
        );
        let one = Blocks { free: 9, ..b };
        assert!(plan(&CFG, one, &[decoding(3)], &[prompt(40)])
            .admit
            .is_empty());
    }

    #[test]
    fn the_newest_is_preempted_when_blocks_run_out() {
        // Every sequence sits at a block boundary: each decode needs a new block; 1 is free.
        let b = pool(1, 7);
        let running = [decoding(8), decoding(4), decoding(8)];
        let p = plan(&CFG, b, &running, &[prompt(1)]);
        // The oldest takes the free block; the second needs one: the newest (2 blocks) goes.
        assert_eq!(p.preempt, vec![2]);
        assert_eq!(p.tokens, vec![1, 1, 0]);
        assert!(p.admit.is_empty(), "no admission in a step that preempted");
    }

    #[test]
    fn a_lone_sequence_without_room_preempts_itself() {
        let full = pool(0, 2);
        let p = plan(&CFG, full, &[decoding(8)], &[]);
        assert_eq!((p.preempt, p.tokens), (vec![0], vec![0]));
        // Waiting again with 9 tokens it needs 3 blocks of a 2-block pool: never.
        let p = plan(&CFG, Blocks { free: 2, ..full }, &[], &[prompt(9)]);
        assert!(p.reject_head);
    }

    #[test]
    fn a_waiting_prompt_is_admitted_once_blocks_free_up() {
        // No starvation: once the running sequence finishes, the head of the queue goes in.
        let b = pool(2, 10);
        let waiting = [prompt(30), prompt(1)];
        assert!(plan(&CFG, b, &[decoding(30)], &waiting).admit.is_empty());
        let after = Blocks { free: 10, ..b };
        assert_eq!(plan(&CFG, after, &[], &waiting).admit, vec![30, 1]);
    }

    #[test]
    fn images_are_encoded_within_the_encoder_budget() {
        let image = |tokens| SeqState {
            encoder: tokens,
            ..prompt(tokens + 5)
        };
        let tight = SchedulerConfig {
            max_encoder_tokens: 64,
            ..CFG
        };
        // The first request with images goes even beyond the budget; the next waits (FCFS:
        // the text prompt behind it waits too), however much token budget is left.
        let waiting = [image(80), image(10), prompt(3)];
        assert_eq!(plan(&tight, ROOMY, &[], &waiting).admit, vec![85]);
        // Within the budget, images are encoded together.
        let small = [image(30), image(30), image(30), prompt(3)];
        assert_eq!(plan(&tight, ROOMY, &[], &small).admit, vec![35, 35]);
        // Text-only prompts do not spend it.
        let mixed = [prompt(3), image(64), prompt(4)];
        assert_eq!(plan(&tight, ROOMY, &[], &mixed).admit, vec![3, 69, 4]);
    }

    #[test]
    fn a_preempted_sequence_is_recomputed_in_chunks() {
        // Back in the queue with 120 prompt + 30 generated tokens, none cached.
        let p = plan(&CFG, ROOMY, &[], &[prompt(150)]);
        assert_eq!(p.admit, vec![100]);
    }

    #[test]
    fn a_cached_prefix_needs_blocks_only_for_the_rest() {
        let b = pool(3, 10);
        // 20 tokens, 16 of them in 4 cached blocks another sequence holds: 1 new block.
        let hit = SeqState {
            cached: 16,
            uncached: 4,
            frees: 0,
            revives: 0,
            encoder: 0,
        };
        assert_eq!(plan(&CFG, b, &[], &[hit, prompt(8)]).admit, vec![4, 8]);
        // Cached-free blocks it takes back count against the free ones: 1 + 3 > 3.
        let revived = SeqState { revives: 3, ..hit };
        assert!(plan(&CFG, b, &[], &[revived]).admit.is_empty());
        // The whole sequence must still fit the pool.
        let huge = SeqState {
            cached: 40,
            uncached: 1,
            ..hit
        };
        assert!(plan(&CFG, b, &[], &[huge]).reject_head);
    }

    #[test]
    fn preempting_a_sequence_frees_only_its_own_blocks() {
        // Both hold 2 blocks; the newer shares both of its full ones with the older, so
        // preempting it frees nothing and the older must preempt itself too.
        let b = pool(0, 3);
        let shared = SeqState {
            frees: 0,
            ..decoding(8)
        };
        let p = plan(&CFG, b, &[decoding(8), shared], &[]);
        assert_eq!((p.preempt, p.tokens), (vec![1, 0], vec![0, 0]));
    }
}
