//! How the launcher shows rank 0's progress on its stderr (`log.progress`):
//! the learner's `sft ...` / `step ...` / `eval step ...` / `completion
//! step ...` lines echoed as they are, or one bar (indicatif) whose message is
//! the latest step line, with eval and completion lines and the launcher's
//! own messages printed above it.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle, TermLike};
use learner::recipe::Progress;

/// One of the learner's progress lines (learner/src/train.rs prints them).
#[derive(Debug, PartialEq, Eq)]
pub enum ProgressLine<'a> {
    /// `sft N/M ...` or `step N/M ...`: `phase` is `sft` or `step`, `rest`
    /// the numbers after the count.
    Step {
        phase: &'a str,
        done: u64,
        total: u64,
        rest: &'a str,
    },
    /// `eval step N: pass@1 ...`, `completion step N: ...`
    /// (log.num_completions_to_print) or `note: ...`: printed above the bar.
    Note,
}

/// Parses a learner log line; `None` for anything that is not progress.
pub fn parse(line: &str) -> Option<ProgressLine<'_>> {
    if ["eval step ", "completion step ", "note: "]
        .iter()
        .any(|p| line.starts_with(p))
    {
        return Some(ProgressLine::Note);
    }
    for phase in ["sft", "step"] {
        let Some(after) = line.strip_prefix(phase).and_then(|r| r.strip_prefix(' ')) else {
            continue;
        };
        let (count, rest) = after.split_once(' ').unwrap_or((after, ""));
        let (done, total) = count.split_once('/')?;
        return Some(ProgressLine::Step {
            phase,
            done: done.parse().ok()?,
            total: total.parse().ok()?,
            rest,
        });
    }
    None
}

/// Where progress goes.
pub enum ProgressView {
    /// `launcher: rank 0: <line>` for each progress line.
    Lines,
    /// A bar, made at the first step line (so nothing is drawn while the
    /// servers start), drawn to `target`.
    Bar {
        bar: Option<ProgressBar>,
        target: fn() -> ProgressDrawTarget,
    },
}

impl ProgressView {
    /// `auto`: a bar when stderr is a terminal, lines otherwise; `bar`: a
    /// bar even when stderr does not look like a terminal (a pager, `script`,
    /// a CI log that renders ANSI); `plain`: lines.
    pub fn new(mode: Progress) -> ProgressView {
        match mode {
            Progress::Plain => ProgressView::Lines,
            Progress::Auto if !std::io::stderr().is_terminal() => ProgressView::Lines,
            Progress::Auto => ProgressView::bar_to(ProgressDrawTarget::stderr),
            Progress::Bar => ProgressView::bar_to(forced_stderr),
        }
    }

    pub fn bar_to(target: fn() -> ProgressDrawTarget) -> ProgressView {
        ProgressView::Bar { bar: None, target }
    }

    /// Shows one line of rank 0's log (non-progress lines are skipped).
    pub fn line(&mut self, line: &str) {
        let Some(parsed) = parse(line) else {
            return;
        };
        match (self, parsed) {
            (ProgressView::Lines, _)
            | (ProgressView::Bar { bar: None, .. }, ProgressLine::Note) => {
                eprintln!("launcher: rank 0: {line}")
            }
            (ProgressView::Bar { bar: Some(b), .. }, ProgressLine::Note) => {
                b.suspend(|| eprintln!("launcher: rank 0: {line}"))
            }
            (
                ProgressView::Bar { bar, target },
                ProgressLine::Step {
                    phase,
                    done,
                    total,
                    rest,
                },
            ) => {
                // A new phase (the warm-up ends, GRPO starts) or a resumed
                // run's first line: the old bar stays on screen as the
                // record of its phase, and a new one starts its own clock.
                let same = bar
                    .as_ref()
                    .is_some_and(|b| b.prefix() == phase && b.length() == Some(total));
                if !same {
                    if let Some(old) = bar.take() {
                        close(&old);
                    }
                    let b = ProgressBar::with_draw_target(Some(total), target())
                        .with_style(style())
                        .with_prefix(phase.to_string())
                        .with_position(done);
                    b.reset_eta();
                    *bar = Some(b);
                }
                let Some(b) = bar.as_ref() else { return };
                b.set_position(done);
                b.set_message(rest.to_string());
            }
        }
    }

    /// A launcher message, above the bar if one is drawn.
    pub fn say(&self, message: &str) {
        match self {
            ProgressView::Bar { bar: Some(b), .. } => b.suspend(|| eprintln!("{message}")),
            _ => eprintln!("{message}"),
        }
    }

    /// Leaves the bar where it is (it is not redrawn after this).
    pub fn finish(&mut self) {
        if let ProgressView::Bar { bar, .. } = self
            && let Some(b) = bar.take()
        {
            close(&b);
        }
    }

    /// The bar's (phase, position, length, message), for tests.
    pub fn bar_state(&self) -> Option<(String, u64, Option<u64>, String)> {
        match self {
            ProgressView::Bar { bar: Some(b), .. } => {
                Some((b.prefix(), b.position(), b.length(), b.message()))
            }
            _ => None,
        }
    }
}

/// Stops redrawing `bar` and leaves it on screen; what is printed next
/// goes on the line below it (indicatif leaves the cursor on the bar's line).
fn close(bar: &ProgressBar) {
    bar.abandon();
    if !bar.is_hidden() {
        eprintln!();
    }
}

fn style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{prefix:>4} {pos}/{len} [{bar:20}] {elapsed_precise}<{eta_precise} {wide_msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ")
}

/// stderr through a `TermLike`: indicatif draws to it without asking
/// whether it is a terminal (`log.progress: bar`).
fn forced_stderr() -> ProgressDrawTarget {
    let term: Box<dyn TermLike> = Box::new(console::Term::stderr());
    ProgressDrawTarget::term_like(term)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_learners_lines() {
        assert_eq!(
            parse("step 3/40 reward 0.5000 loss 0.1"),
            Some(ProgressLine::Step {
                phase: "step",
                done: 3,
                total: 40,
                rest: "reward 0.5000 loss 0.1"
            })
        );
        assert_eq!(
            parse("sft 10/300 loss 1.2"),
            Some(ProgressLine::Step {
                phase: "sft",
                done: 10,
                total: 300,
                rest: "loss 1.2"
            })
        );
        assert_eq!(parse("eval step 0: pass@1 0.120"), Some(ProgressLine::Note));
        assert_eq!(
            parse("note: each step makes 2 optimizer updates"),
            Some(ProgressLine::Note)
        );
        assert_eq!(
            parse("completion step 3: reward 1.000 advantage +0.700 | \"1+1\" -> \"2\""),
            Some(ProgressLine::Note)
        );
        assert_eq!(parse("steps are taken"), None);
        assert_eq!(parse("step x/40"), None);
        assert_eq!(parse("2026-12-06T10:00:00Z INFO step 3/40"), None);
    }

    #[test]
    fn the_bar_follows_the_phases_and_steps() {
        let mut v = ProgressView::bar_to(ProgressDrawTarget::hidden);
        v.line("eval step 0: pass@1 0.1");
        assert_eq!(v.bar_state(), None, "no bar before the first step");
        v.line("sft 1/700 loss 2.0");
        v.line("sft 2/700 loss 1.9");
        assert_eq!(
            v.bar_state(),
            Some(("sft".into(), 2, Some(700), "loss 1.9".into()))
        );
        v.line("an info line");
        v.line("step 1/1200 reward 0.2");
        assert_eq!(
            v.bar_state(),
            Some(("step".into(), 1, Some(1200), "reward 0.2".into()))
        );
        v.line("eval step 50: pass@1 0.3");
        v.line("step 51/1200 reward 0.4");
        assert_eq!(v.bar_state().map(|s| s.1), Some(51));
        v.finish();
    }
}
