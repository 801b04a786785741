//! [`StopMatcher`]: OpenAI `stop` strings over streamed text. A stop string never reaches the
//! client, even when it arrives split over several pushes: the longest suffix of the pending
//! text that could still grow into a stop string is held back until it either completes (then
//! only the text before the match is emitted and the matcher reports stopped) or cannot.
//!
//! A stop is detected on the push that completes it; when several stops are complete by then,
//! the text is cut at the earliest match. (So with stops `abcd` and `c`, pushing `abc` stops
//! at `c`; pushing `abcd` at once cuts before `abcd`. vLLM behaves the same per token.)
//!
//! Text pushed with [`StopMatcher::push_unchecked`] (vLLM's `min_tokens`: the first tokens are
//! never checked) holds no match of its own: a stop matches only where it ends in text pushed
//! later, as vLLM checks only stops that include some of the new text.

/// The result of one [`StopMatcher::push`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopOutcome {
    /// Text that is now safe to send to the client.
    pub emit: String,
    /// A stop string matched: the generation should finish with `finish_reason: "stop"`.
    pub stopped: bool,
}

/// Matches the stop strings of one request against its streamed text.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    /// The non-empty stop strings (empty ones would match everywhere and are dropped).
    stops: Vec<String>,
    /// Text received but not yet emitted: a possible start of a stop string.
    pending: String,
    /// Index into `stops` of the stop that matched, once one has.
    matched: Option<usize>,
    /// Bytes at the start of `pending` that came from unchecked pushes: a match must end
    /// after them.
    floor: usize,
}

impl StopMatcher {
    /// A matcher for `stops`; an empty list passes all text through without holding back.
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            ..Self::default()
        }
    }

    /// Adds newly decoded text; returns what can be emitted and whether a stop matched. After a
    /// match every push returns nothing and `stopped: true`.
    pub fn push(&mut self, text: &str) -> StopOutcome {
        if self.matched.is_some() {
            return StopOutcome {
                emit: String::new(),
                stopped: true,
            };
        }
        if self.stops.is_empty() {
            return StopOutcome {
                emit: text.to_string(),
                stopped: false,
            };
        }
        self.pending.push_str(text);
        if let Some((at, index)) = self.earliest_match() {
            self.matched = Some(index);
            let mut emit = std::mem::take(&mut self.pending);
            emit.truncate(at);
            return StopOutcome {
                emit,
                stopped: true,
            };
        }
        StopOutcome {
            emit: self.release(),
            stopped: false,
        }
    }

    /// Adds text that no stop may match inside; a stop may still begin in it and end in text
    /// pushed later, so a possible stop prefix at its end is held back as usual.
    pub fn push_unchecked(&mut self, text: &str) -> StopOutcome {
        if self.matched.is_some() || self.stops.is_empty() {
            return self.push(text);
        }
        self.pending.push_str(text);
        self.floor = self.pending.len();
        StopOutcome {
            emit: self.release(),
            stopped: false,
        }
    }

    /// Emits `pending` but for the longest suffix that could still grow into a stop.
    fn release(&mut self) -> String {
        let cut = self.pending.len() - self.held_suffix_len();
        self.floor = self.floor.saturating_sub(cut);
        self.pending.drain(..cut).collect()
    }

    /// At the end of generation (no stop matched): the held-back text, which turned out not to
    /// be a stop string. Empty after a match.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Whether a stop string has matched.
    pub fn is_stopped(&self) -> bool {
        self.matched.is_some()
    }

    /// The stop string that matched, if any (vLLM reports it as `stop_reason`).
    pub fn matched_stop(&self) -> Option<&str> {
        self.matched.map(|i| self.stops[i].as_str())
    }

    /// Byte offset and stop index of the earliest complete stop in `pending` that ends after
    /// `floor`.
    fn earliest_match(&self) -> Option<(usize, usize)> {
        let text = self.pending.as_str();
        self.stops
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                // A match starting before `from` would end within the floor.
                let from = self.floor.saturating_sub(s.len() - 1);
                let from = (from..=text.len()).find(|&b| text.is_char_boundary(b))?;
                text[from..].find(s.as_str()).map(|at| (from + at, i))
            })
            .min()
    }

    /// Length of the longest suffix of `pending` that is a proper prefix of some stop.
    fn held_suffix_len(&self) -> usize {
        self.stops
            .iter()
            .filter_map(|stop| {
                let mut cuts = stop.char_indices().rev().map(|(i, _)| i);
                cuts.find(|&k| k > 0 && self.pending.ends_with(&stop[..k]))
            })
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};

    /// Streams `pieces` and returns (emitted text including the flush, stopped).
    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for piece in pieces {
            let o = m.push(piece);
            out.push_str(&o.emit);
            if o.stopped {
                assert!(m.flush().is_empty());
                return (out, true);
            }
        }
        out.push_str(&m.flush());
        (out, false)
    }

    /// Every split of `text` into three pieces at char boundaries.
    fn three_way_splits(text: &str) -> Vec<[&str; 3]> {
        let cuts: Vec<usize> = (0..=text.len())
            .filter(|&i| text.is_char_boundary(i))
            .collect();
        let mut splits = Vec::new();
        for (n, &a) in cuts.iter().enumerate() {
            for &b in &cuts[n..] {
                splits.push([&text[..a], &text[a..b], &text[b..]]);
            }
        }
        splits
    }

    #[test]
    fn stop_split_at_every_boundary_never_leaks() {
        let cases = [
            (&["STOP"][..], "hello STOP world", "hello "),
            (&["。", "👍🏽"][..], "猫です👍🏽。終", "猫です"),
            (&["\n\n", "User:"][..], "a\nb\n\nUser: c", "a\nb"),
            (&["ab", "b"][..], "xxab", "xx"),
            (&["aab"][..], "aaab aab", "a"),
            (&["end"][..], "no stop here, en", "no stop here, en"),
        ];
        for (stops, text, expected) in cases {
            let stopped = expected.len() < text.len();
            for pieces in three_way_splits(text) {
                let got = run(stops, &pieces);
                assert_eq!(got, (expected.to_string(), stopped), "{stops:?} {pieces:?}");
            }
        }
    }

    /// Reference for stop sets where no stop contains another except as a suffix: the text
    /// before the earliest occurrence of any stop.
    fn reference(stops: &[&str], text: &str) -> (String, bool) {
        match stops.iter().filter_map(|s| text.find(s)).min() {
            Some(at) => (text[..at].to_string(), true),
            None => (text.to_string(), false),
        }
    }

    #[test]
    fn random_texts_and_splits_match_reference() {
        let alphabet = ["a", "b", "é", "猫", " "];
        let stop_sets: [&[&str]; 4] = [&["ab"], &["a猫", "bé"], &["aab", "é é"], &["猫猫猫"]];
        for seed in 0..500u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let text: String = (0..rng.gen_range(0..20))
                .map(|_| *alphabet.choose(&mut rng).unwrap())
                .collect();
            let stops = stop_sets[seed as usize % stop_sets.len()];
            let mut pieces = Vec::new();
            let mut rest = text.as_str();
            while !rest.is_empty() {
                let mut cut = rng.gen_range(0..=rest.len());
                while !rest.is_char_boundary(cut) {
                    cut += 1;
                }
                pieces.push(&rest[..cut]);
                rest = &rest[cut..];
            }
            assert_eq!(run(stops, &pieces), reference(stops, &text), "{pieces:?}");
        }
    }

    #[test]
    fn holds_back_only_possible_stop_prefixes() {
        let mut m = StopMatcher::new(vec!["</answer>".into()]);
        assert_eq!(m.push("x </an").emit, "x ");
        assert_eq!(m.push("d").emit, "</and");
        assert_eq!(m.push("<").emit, "");
        assert_eq!(m.flush(), "<");
    }

    #[test]
    fn empty_stop_list_is_passthrough() {
        let mut m = StopMatcher::new(vec![]);
        assert_eq!(m.push("a").emit, "a");
        let mut m = StopMatcher::new(vec![String::new()]);
        let o = m.push("abc");
        assert_eq!((o.emit.as_str(), o.stopped), ("abc", false));
        assert_eq!(m.flush(), "");
    }

    #[test]
    fn reports_which_stop_matched_and_stays_stopped() {
        let mut m = StopMatcher::new(vec!["x".into(), "yz".into()]);
        assert_eq!(
            m.push("ay"),
            StopOutcome {
                emit: "a".into(),
                stopped: false
            }
        );
        let o = m.push("zx");
        assert_eq!((o.emit.as_str(), o.stopped), ("", true));
        assert_eq!(m.matched_stop(), Some("yz"));
        assert!(m.is_stopped());
        assert_eq!(
            m.push("more"),
            StopOutcome {
                emit: String::new(),
                stopped: true
            }
        );
    }

    #[test]
    fn unchecked_text_holds_no_stop_but_may_start_one() {
        let mut m = StopMatcher::new(vec!["ab".into(), "é".into()]);
        assert_eq!(m.push_unchecked("xab éa").emit, "xab é");
        let o = m.push("b");
        assert_eq!((o.emit.as_str(), o.stopped), ("", true));
        assert_eq!(m.matched_stop(), Some("ab"));

        let mut m = StopMatcher::new(vec!["aa".into()]);
        assert_eq!(m.push_unchecked("aa").emit, "a");
        let o = m.push("a");
        // The overlapping `aa` that ends in the new text matches: "a" in all, as vLLM.
        assert_eq!((o.emit.as_str(), o.stopped), ("", true));

        let mut m = StopMatcher::new(vec!["e".into()]);
        assert_eq!(m.push_unchecked(" Lee").emit, " Lee");
        assert_eq!(m.push("ent").emit, "");
        assert!(m.is_stopped());
    }

    #[test]
    fn nested_stop_detected_when_it_completes() {
        assert_eq!(run(&["abcd", "c"], &["abc", "d"]), ("ab".to_string(), true));
        assert_eq!(run(&["abcd", "c"], &["abcd"]), (String::new(), true));
    }
}
