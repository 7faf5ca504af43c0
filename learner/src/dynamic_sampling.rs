//! DAPO's dynamic sampling (verl `algorithm.filter_groups`, OpenRLHF
//! `--dynamic_filtering`): a group whose rewards all tie has advantage 0 and
//! teaches nothing, so it is left out and more prompts are generated until
//! the step holds its full number of groups that do.
//!
//! Every rank sees every group's rewards (they are gathered for the
//! advantages), so every rank makes the same choice without another message:
//! the first `target` groups that pass, in the global order (generation
//! round, then prompt slot, then rank).

use anyhow::{Result, bail};

use crate::recipe::TrainSection;

/// One group's rewards, as every rank sees them after the gather.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupRewards {
    /// The generation round of the step it came from (0: the first).
    pub round: usize,
    /// Its prompt slot on the rank that generated it.
    pub slot: usize,
    pub rank: usize,
    /// The weighted total of each completion.
    pub totals: Vec<f64>,
    /// Each reward function's value of each completion, `[F][G]`.
    pub per_function: Vec<Vec<f64>>,
}

/// One group's reward values: each completion's total (`[G]`) and each
/// function's value of each completion (`[F][G]`).
pub type GroupValues = (Vec<f64>, Vec<Vec<f64>>);

/// The values a rank contributes to a round's gather: per prompt slot a kept
/// flag (0: the group was dropped, its client tag foreign), then G x (total,
/// f_1..f_F). `groups[i]` is slot i's values.
pub fn encode_slots(
    groups: &[Option<GroupValues>],
    group_size: usize,
    num_functions: usize,
) -> Vec<f64> {
    let width = slot_width(group_size, num_functions);
    let mut out = vec![0.0; groups.len() * width];
    for (i, group) in groups.iter().enumerate() {
        let Some((totals, per_function)) = group else {
            continue;
        };
        let base = i * width;
        out[base] = 1.0;
        for j in 0..group_size {
            let b = base + 1 + j * (1 + num_functions);
            out[b] = totals[j];
            for (f, values) in per_function.iter().enumerate() {
                out[b + 1 + f] = values[j];
            }
        }
    }
    out
}

fn slot_width(group_size: usize, num_functions: usize) -> usize {
    1 + group_size * (1 + num_functions)
}

/// The groups of one round from every rank's [`encode_slots`] values, in the
/// global order (slot, then rank); dropped groups are left out.
pub fn decode_round(
    gathered: &[Vec<f64>],
    round: usize,
    slots_per_rank: usize,
    group_size: usize,
    num_functions: usize,
) -> Result<Vec<GroupRewards>> {
    let width = slot_width(group_size, num_functions);
    if let Some((r, v)) = gathered
        .iter()
        .enumerate()
        .find(|(_, v)| v.len() != slots_per_rank * width)
    {
        bail!(
            "rank {r} sent {} reward values for round {round}, expected {} ({slots_per_rank} \
             groups): do the ranks run the same recipe?",
            v.len(),
            slots_per_rank * width
        );
    }
    let mut out = Vec::new();
    for slot in 0..slots_per_rank {
        for (rank, values) in gathered.iter().enumerate() {
            let s = &values[slot * width..(slot + 1) * width];
            if s[0] == 0.0 {
                continue;
            }
            let completion = |j: usize| &s[1 + j * (1 + num_functions)..][..1 + num_functions];
            out.push(GroupRewards {
                round,
                slot,
                rank,
                totals: (0..group_size).map(|j| completion(j)[0]).collect(),
                per_function: (0..num_functions)
                    .map(|f| (0..group_size).map(|j| completion(j)[1 + f]).collect())
                    .collect(),
            });
        }
    }
    Ok(out)
}

/// Which values decide (verl's `filter_groups.metric`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Metric {
    /// The weighted total (verl's `score` / `seq_reward`).
    Total,
    /// One reward function's values (its index in recipe order), e.g. the
    /// correctness function (verl's `acc`).
    Function(usize),
}

/// When a group is kept.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KeepRule {
    /// Its values are not all equal (verl: std > 0): it has a learning
    /// signal whatever the values are.
    NotTied,
    /// Its mean lies strictly between the two (OpenRLHF's
    /// `--dynamic_filtering_reward_range`).
    MeanInside(f64, f64),
}

/// The recipe's dynamic-sampling settings, resolved against the reward
/// functions.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupFilter {
    pub metric: Metric,
    pub rule: KeepRule,
}

impl GroupFilter {
    /// `None` when `train.dynamic_sampling` is off. `labels`: the reward
    /// functions' logged names, in recipe order.
    pub fn from_recipe(t: &TrainSection, labels: &[String]) -> Result<Option<GroupFilter>> {
        if !t.dynamic_sampling {
            return Ok(None);
        }
        let metric = match t.dynamic_sampling_metric.as_deref() {
            None | Some("reward") => Metric::Total,
            Some(name) => match labels.iter().position(|l| l == name) {
                Some(i) => Metric::Function(i),
                None => bail!(
                    "train.dynamic_sampling_metric: no reward function is logged as `{name}`; \
                     use `reward` (the weighted total) or one of: {}",
                    labels.join(", ")
                ),
            },
        };
        let rule = match t.dynamic_sampling_reward_range {
            None => KeepRule::NotTied,
            Some([lo, hi]) => KeepRule::MeanInside(lo, hi),
        };
        Ok(Some(GroupFilter { metric, rule }))
    }

    /// Whether `group` carries a learning signal by this filter.
    pub fn keeps(&self, group: &GroupRewards) -> bool {
        let values = match self.metric {
            Metric::Total => &group.totals,
            Metric::Function(f) => &group.per_function[f],
        };
        // A Python function's None (NaN) carries no signal.
        let values: Vec<f64> = values.iter().copied().filter(|v| !v.is_nan()).collect();
        if values.is_empty() {
            return false;
        }
        match self.rule {
            KeepRule::NotTied => values.iter().any(|v| *v != values[0]),
            KeepRule::MeanInside(lo, hi) => {
                let mean = values.iter().sum::<f64>() / values.len() as f64;
                lo < mean && mean < hi
            }
        }
    }
}

/// The groups a step trains on, gathered round by round.
#[derive(Debug, Clone)]
pub struct GroupSelection {
    filter: Option<GroupFilter>,
    /// Groups the step trains on; with a filter, at most this many.
    target: usize,
    /// The chosen groups, in the global order.
    pub chosen: Vec<GroupRewards>,
    /// Rounds added.
    pub rounds: usize,
    /// Groups received (their client tag the rank's own), over all rounds.
    pub received: usize,
    /// Groups the filter left out.
    pub filtered: usize,
    /// Groups that passed beyond the target (generated, not trained on, as
    /// verl trims its batch).
    pub surplus: usize,
    /// Sum and count of every received completion's total reward.
    received_reward: (f64, usize),
}

impl GroupSelection {
    /// Without a filter every received group is chosen (one round).
    pub fn new(filter: Option<GroupFilter>, target: usize) -> GroupSelection {
        GroupSelection {
            filter,
            target,
            chosen: Vec::new(),
            rounds: 0,
            received: 0,
            filtered: 0,
            surplus: 0,
            received_reward: (0.0, 0),
        }
    }

    /// Takes one round's groups (in the global order).
    pub fn add_round(&mut self, groups: Vec<GroupRewards>) {
        self.rounds += 1;
        for group in groups {
            self.received += 1;
            self.received_reward.0 += group.totals.iter().sum::<f64>();
            self.received_reward.1 += group.totals.len();
            match &self.filter {
                None => self.chosen.push(group),
                Some(f) if !f.keeps(&group) => self.filtered += 1,
                Some(_) if self.chosen.len() >= self.target => self.surplus += 1,
                Some(_) => self.chosen.push(group),
            }
        }
    }

    /// Whether another round is needed: a filter is on and the step holds
    /// fewer than its target.
    pub fn wants_more(&self) -> bool {
        self.filter.is_some() && self.chosen.len() < self.target
    }

    /// The mean total reward of every received completion, the filtered
    /// ones included (what the policy scores now; the chosen groups'
    /// mean is biased towards the middle by the filter).
    pub fn received_reward_mean(&self) -> f64 {
        let (sum, n) = self.received_reward;
        if n == 0 { f64::NAN } else { sum / n as f64 }
    }
}

/// Prompts per rank in one generation round: `step_prompts` (the step's,
/// per rank), or `train.dynamic_sampling_batch_prompts` shared by the
/// `world` ranks (which `Recipe::for_world_size` checked splits).
pub fn round_prompts_per_rank(t: &TrainSection, world: usize, step_prompts: usize) -> usize {
    match t.dynamic_sampling_batch_prompts {
        Some(n) => n / world.max(1),
        None => step_prompts,
    }
}

/// Generation rounds a step may make: `max_num_gen_batches` (verl's), or
/// with 0 (verl's "no limit") as many as one pass over the training prompts
/// takes, so that a run whose every group ties stops with an error instead
/// of sampling forever.
pub fn max_rounds(max_num_gen_batches: u32, epoch_prompts: u64, round_prompts: usize) -> usize {
    if max_num_gen_batches > 0 {
        return max_num_gen_batches as usize;
    }
    (epoch_prompts.div_ceil(round_prompts.max(1) as u64) as usize).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(round: usize, slot: usize, rank: usize, totals: &[f64]) -> GroupRewards {
        GroupRewards {
            round,
            slot,
            rank,
            totals: totals.to_vec(),
            per_function: vec![totals.iter().map(|t| t * 2.0).collect(), totals.to_vec()],
        }
    }

    #[test]
    fn slots_round_trip_in_the_global_order() {
        // Two ranks, two slots each, G = 2, F = 2; rank 1's slot 0 dropped.
        let r0 = encode_slots(
            &[
                Some((vec![1.0, 2.0], vec![vec![3.0, 4.0], vec![5.0, 6.0]])),
                Some((vec![7.0, 8.0], vec![vec![9.0, 10.0], vec![11.0, 12.0]])),
            ],
            2,
            2,
        );
        let r1 = encode_slots(
            &[
                None,
                Some((vec![0.5, 0.0], vec![vec![0.0, 0.0], vec![0.5, 0.0]])),
            ],
            2,
            2,
        );
        assert_eq!(r0.len(), 2 * (1 + 2 * 3));
        let groups = decode_round(&[r0, r1], 3, 2, 2, 2).unwrap();
        let order: Vec<(usize, usize)> = groups.iter().map(|g| (g.slot, g.rank)).collect();
        assert_eq!(order, vec![(0, 0), (1, 0), (1, 1)]);
        assert!(groups.iter().all(|g| g.round == 3));
        assert_eq!(groups[1].totals, vec![7.0, 8.0]);
        assert_eq!(
            groups[1].per_function,
            vec![vec![9.0, 10.0], vec![11.0, 12.0]]
        );
        assert_eq!(groups[2].totals, vec![0.5, 0.0]);
        assert_eq!(groups[2].per_function, vec![vec![0.0, 0.0], vec![0.5, 0.0]]);
        // A rank that sent another shape is named.
        let err = decode_round(&[vec![0.0; 14], vec![0.0; 7]], 0, 2, 2, 2).unwrap_err();
        assert!(err.to_string().contains("rank 1 sent 7"), "{err}");
    }

    #[test]
    fn the_filter_keeps_groups_with_a_signal() {
        let tied = group(0, 0, 0, &[1.0, 1.0, 1.0]);
        let varied = group(0, 0, 0, &[1.0, 0.0, 0.0]);
        let not_tied = GroupFilter {
            metric: Metric::Total,
            rule: KeepRule::NotTied,
        };
        assert!(!not_tied.keeps(&tied));
        assert!(not_tied.keeps(&varied));
        // OpenRLHF's range is strict at both ends.
        let range = GroupFilter {
            metric: Metric::Total,
            rule: KeepRule::MeanInside(0.0, 1.0),
        };
        assert!(!range.keeps(&tied));
        assert!(range.keeps(&varied));
        assert!(!range.keeps(&group(0, 0, 0, &[0.0, 0.0])));
        let narrow = GroupFilter {
            metric: Metric::Total,
            rule: KeepRule::MeanInside(0.5, 1.0),
        };
        assert!(!narrow.keeps(&varied)); // mean 1/3
        // By one function: function 0 is 2 x total, function 1 the total.
        let by_fn = GroupFilter {
            metric: Metric::Function(0),
            rule: KeepRule::MeanInside(0.5, 1.0),
        };
        assert!(by_fn.keeps(&varied)); // mean 2/3
        // A Python function's None (NaN) is no value: a group where it
        // applies to one completion only, or to none, has no signal by it.
        let mut partial = varied.clone();
        partial.per_function[1] = vec![1.0, f64::NAN, f64::NAN];
        let by_none = GroupFilter {
            metric: Metric::Function(1),
            rule: KeepRule::NotTied,
        };
        assert!(!by_none.keeps(&partial));
        partial.per_function[1] = vec![1.0, f64::NAN, 0.0];
        assert!(by_none.keeps(&partial));
        partial.per_function[1] = vec![f64::NAN; 3];
        assert!(!by_none.keeps(&partial));
    }

    #[test]
    fn the_selection_takes_the_first_groups_that_pass_and_counts_the_rest() {
        let filter = GroupFilter {
            metric: Metric::Total,
            rule: KeepRule::NotTied,
        };
        let mut s = GroupSelection::new(Some(filter), 3);
        assert!(s.wants_more());
        s.add_round(vec![
            group(0, 0, 0, &[0.0, 0.0]),
            group(0, 0, 1, &[1.0, 0.0]),
            group(0, 1, 0, &[1.0, 1.0]),
        ]);
        assert!(s.wants_more());
        s.add_round(vec![
            group(1, 0, 0, &[0.0, 1.0]),
            group(1, 0, 1, &[0.0, 0.0]),
            group(1, 1, 0, &[0.0, 1.0]),
            group(1, 1, 1, &[1.0, 0.0]),
        ]);
        assert!(!s.wants_more());
        let chosen: Vec<(usize, usize, usize)> =
            s.chosen.iter().map(|g| (g.round, g.slot, g.rank)).collect();
        assert_eq!(chosen, vec![(0, 0, 1), (1, 0, 0), (1, 1, 0)]);
        assert_eq!((s.rounds, s.received, s.filtered, s.surplus), (2, 7, 3, 1));
        assert_eq!(s.received_reward_mean(), 6.0 / 14.0);

        // No filter: everything, one round.
        let mut all = GroupSelection::new(None, 1);
        all.add_round(vec![
            group(0, 0, 0, &[0.0, 0.0]),
            group(0, 0, 1, &[1.0, 1.0]),
        ]);
        assert_eq!(all.chosen.len(), 2);
        assert!(!all.wants_more());
    }

    #[test]
    fn the_recipe_sets_the_filter_and_the_round_size() {
        let mut t = TrainSection::default();
        let labels = vec!["exact_match".to_string(), "format".to_string()];
        assert_eq!(GroupFilter::from_recipe(&t, &labels).unwrap(), None);
        assert_eq!(round_prompts_per_rank(&t, 2, 4), 4);
        t.dynamic_sampling = true;
        assert_eq!(
            GroupFilter::from_recipe(&t, &labels).unwrap(),
            Some(GroupFilter {
                metric: Metric::Total,
                rule: KeepRule::NotTied
            })
        );
        t.dynamic_sampling_metric = Some("format".into());
        t.dynamic_sampling_reward_range = Some([0.0, 1.0]);
        assert_eq!(
            GroupFilter::from_recipe(&t, &labels).unwrap(),
            Some(GroupFilter {
                metric: Metric::Function(1),
                rule: KeepRule::MeanInside(0.0, 1.0)
            })
        );
        t.dynamic_sampling_metric = Some("acc".into());
        let err = GroupFilter::from_recipe(&t, &labels)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("dynamic_sampling_metric") && err.contains("exact_match, format"),
            "{err}"
        );
        t.dynamic_sampling_batch_prompts = Some(12);
        assert_eq!(round_prompts_per_rank(&t, 2, 4), 6);
    }

    #[test]
    fn an_unlimited_search_stops_after_one_pass_over_the_prompts() {
        assert_eq!(max_rounds(10, 1000, 8), 10);
        assert_eq!(max_rounds(0, 1000, 8), 125);
        assert_eq!(max_rounds(0, 1001, 8), 126);
        assert_eq!(max_rounds(0, 3, 8), 1);
    }
}
