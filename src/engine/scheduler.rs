//! The scheduling decision of one engine step, as pure data.
//!
//! Every running sequence decodes one token per step. Waiting sequences are
//! admitted first come, first served while seats (`max_num_seqs`) and the step's
//! token budget (`max_batched_tokens`) allow; the queue is never skipped, so a
//! long prompt at the front cannot be starved by short ones behind it. A prompt
//! larger than the whole budget is still admitted when nothing else runs, so it
//! is never stuck (chunked prefill will split it instead).

/// Limits that shape each step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Most sequences in one batch (running plus newly admitted).
    pub max_num_seqs: usize,
    /// Most tokens (prefill plus decode) in one forward pass.
    pub max_batched_tokens: usize,
}

/// What to run this step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// How many sequences from the front of the waiting queue to prefill.
    pub admit: usize,
    /// How many running sequences decode (all of them).
    pub decode: usize,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.admit == 0 && self.decode == 0
    }
}

/// Plans one step from the waiting prompts' lengths (queue order) and the number
/// of running sequences.
pub fn plan(cfg: &SchedulerConfig, waiting_prompt_lens: &[usize], running: usize) -> Plan {
    let mut seats = cfg.max_num_seqs.saturating_sub(running);
    let mut budget = cfg.max_batched_tokens.saturating_sub(running);
    let mut admit = 0;
    for &len in waiting_prompt_lens {
        if seats == 0 {
            break;
        }
        let alone = running == 0 && admit == 0;
        if len > budget && !alone {
            break;
        }
        budget = budget.saturating_sub(len);
        seats -= 1;
        admit += 1;
    }
    Plan {
        admit,
        decode: running,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: SchedulerConfig = SchedulerConfig {
        max_num_seqs: 4,
        max_batched_tokens: 100,
    };

    #[test]
    fn idle_plans_nothing() {
        assert!(plan(&CFG, &[], 0).is_empty());
    }

    #[test]
    fn running_sequences_always_decode() {
        assert_eq!(
            plan(&CFG, &[], 3),
            Plan {
                admit: 0,
                decode: 3
            }
        );
    }

    #[test]
    fn admits_up_to_the_seat_limit() {
        assert_eq!(plan(&CFG, &[1, 1, 1, 1, 1], 0).admit, 4);
        assert_eq!(plan(&CFG, &[1, 1, 1], 2).admit, 2);
        assert_eq!(plan(&CFG, &[1], 4).admit, 0);
    }

    #[test]
    fn token_budget_counts_decodes_and_prompts() {
        // 3 decode tokens leave 97: 60 fits, then 40 does not.
        assert_eq!(plan(&CFG, &[60, 40], 3).admit, 1);
        assert_eq!(plan(&CFG, &[50, 50], 0).admit, 2);
        assert_eq!(plan(&CFG, &[50, 51], 0).admit, 1);
    }

    #[test]
    fn first_come_first_served_without_skipping() {
        // The short prompt behind a long one waits its turn.
        assert_eq!(plan(&CFG, &[98, 1], 3).admit, 0);
    }

    #[test]
    fn oversized_prompt_runs_alone_when_idle() {
        assert_eq!(plan(&CFG, &[500, 1], 0).admit, 1);
        assert_eq!(plan(&CFG, &[500], 1).admit, 0);
    }

    #[test]
    fn a_waiting_prompt_is_admitted_once_decodes_finish() {
        // No starvation: once running drains, the head of the queue goes in.
        let waiting = [150];
        assert_eq!(plan(&CFG, &waiting, 2).admit, 0);
        assert_eq!(plan(&CFG, &waiting, 0).admit, 1);
    }
}
