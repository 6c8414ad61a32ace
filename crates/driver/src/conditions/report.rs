//! The verdicts on a machine's conditions: passed, failed (with the evidence gathered) or not
//! reached (the machine broke first), each with when it was decided; shown as a text table, as
//! JSON, and as JUnit (one case per condition, through the test log's writer).

use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use crate::log::SubtestRecord;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Passed,
    Failed,
    NotReached,
}

/// One condition's verdict.
#[derive(Debug, Clone, Serialize)]
pub struct ConditionResult {
    pub name: String,
    pub expected: String,
    pub outcome: Outcome,
    /// Seconds from the machine's start to the verdict.
    pub after_seconds: f64,
    /// Why it failed or was not reached.
    pub reason: Option<String>,
    /// Commands run to explain a failure, with what they printed.
    pub evidence: Vec<Evidence>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Evidence {
    pub command: String,
    pub output: String,
}

/// Every condition of one machine.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub machine: String,
    pub results: Vec<ConditionResult>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.results.iter().all(|r| r.outcome == Outcome::Passed)
    }

    /// A table for the terminal, then the evidence of each failure.
    pub fn text(&self) -> String {
        let width = self.results.iter().map(|r| r.name.len()).max().unwrap_or(0).max("condition".len());
        let mut text = format!("{:<width$}  {:<11}  {:>8}  expected\n", "condition", "result", "after");
        for r in &self.results {
            let outcome = match r.outcome {
                Outcome::Passed => "passed",
                Outcome::Failed => "FAILED",
                Outcome::NotReached => "not reached",
            };
            text.push_str(&format!("{:<width$}  {outcome:<11}  {:>7.1}s  {}\n", r.name, r.after_seconds, r.expected));
        }
        for r in self.results.iter().filter(|r| r.outcome != Outcome::Passed) {
            text.push_str(&format!("\n--- {}: {}\n", r.name, r.reason.as_deref().unwrap_or("")));
            for evidence in &r.evidence {
                text.push_str(&format!("$ {}\n{}\n", evidence.command, evidence.output.trim_end()));
            }
        }
        text
    }

    pub fn json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a report serializes")
    }

    /// The JUnit report: one case per condition.
    pub fn write_junit(&self, path: &Path) -> std::io::Result<()> {
        let cases: Vec<SubtestRecord> = self
            .results
            .iter()
            .map(|r| SubtestRecord {
                name: r.name.clone(),
                duration: Duration::from_secs_f64(r.after_seconds),
                failure: (r.outcome != Outcome::Passed).then(|| {
                    let mut text = r.reason.clone().unwrap_or_default();
                    for evidence in &r.evidence {
                        text.push_str(&format!("\n$ {}\n{}", evidence.command, evidence.output.trim_end()));
                    }
                    text
                }),
            })
            .collect();
        crate::log::write_junit(path, &format!("{} conditions", self.machine), &cases, None)
    }
}
