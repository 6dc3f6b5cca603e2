//! The results table: one row per measured figure, with its baseline from the same run, the
//! ratio, the target and whether it was met. Printed to stdout and written as Markdown.

use std::fmt::Write as _;

/// Whether a row has a target, and whether it was met.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Met,
    Missed,
    /// Context for another row; no target of its own.
    Info,
}

impl Verdict {
    /// `Met` when `ok`, else `Missed`.
    pub fn of(ok: bool) -> Verdict {
        if ok { Verdict::Met } else { Verdict::Missed }
    }

    fn label(self) -> &'static str {
        match self {
            Verdict::Met => "met",
            Verdict::Missed => "**missed**",
            Verdict::Info => "",
        }
    }
}

/// One line of the table.
#[derive(Clone, Debug)]
pub struct Row {
    /// The figure number.
    pub figure: u8,
    pub measure: String,
    /// kiam-rs's value.
    pub value: String,
    /// The same-run baseline's value (empty when the figure has none).
    pub baseline: String,
    pub ratio: String,
    pub target: String,
    pub verdict: Verdict,
}

impl Row {
    /// A row without a baseline.
    pub fn plain(figure: u8, measure: &str, value: String, target: &str, verdict: Verdict) -> Row {
        Row {
            figure,
            measure: measure.to_owned(),
            value,
            baseline: String::new(),
            ratio: String::new(),
            target: target.to_owned(),
            verdict,
        }
    }

    /// A row with a baseline and the ratio of the two.
    pub fn compared(
        figure: u8,
        measure: &str,
        value: String,
        baseline: String,
        ratio: String,
        target: &str,
        verdict: Verdict,
    ) -> Row {
        Row {
            figure,
            measure: measure.to_owned(),
            value,
            baseline,
            ratio,
            target: target.to_owned(),
            verdict,
        }
    }
}

/// Where and when the run happened.
pub struct Machine {
    pub date: String,
    pub cpu: String,
    pub cores: usize,
    pub kernel: String,
    pub revision: String,
}

impl Machine {
    /// Reads the machine's description from `/proc`; `revision` names the code measured.
    pub fn describe(revision: String, date: String) -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|line| line.strip_prefix("model name"))
            .map(|rest| rest.trim_start_matches([' ', '\t', ':']).trim().to_owned())
            .unwrap_or_else(|| "unknown".into());
        let kernel =
            std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Machine { date, cpu, cores, kernel, revision }
    }
}

/// The whole report as Markdown: the machine, the table, and the notes each figure added.
pub fn markdown(machine: &Machine, rows: &[Row], notes: &[String], elapsed_s: f64) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# kiam-rs benchmark results\n");
    let _ = writeln!(
        out,
        "{} · {} cores ({}) · Linux {} · {} · suite took {:.0} s\n",
        machine.date, machine.cores, machine.cpu, machine.kernel, machine.revision, elapsed_s
    );
    let _ = writeln!(out, "| # | measure | kiam-rs | baseline (same run) | ratio | target | verdict |");
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    for row in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} |",
            row.figure,
            row.measure,
            row.value,
            row.baseline,
            row.ratio,
            row.target,
            row.verdict.label()
        );
    }
    if !notes.is_empty() {
        let _ = writeln!(out, "\nHow each figure was measured in this run:\n");
        for note in notes {
            let _ = writeln!(out, "- {note}");
        }
    }
    out
}

/// What the figures add up to: the rows, and one note per figure on how it was measured.
#[derive(Default)]
pub struct Report {
    pub rows: Vec<Row>,
    pub notes: Vec<String>,
}

impl Report {
    /// Adds a row, and prints it at once so a long run shows progress.
    pub fn row(&mut self, row: Row) {
        println!(
            "  fig {} · {}: {} {} {}",
            row.figure,
            row.measure,
            row.value,
            row.ratio,
            row.verdict.label()
        );
        self.rows.push(row);
    }

    /// Adds a note on method.
    pub fn note(&mut self, note: String) {
        self.notes.push(note);
    }
}
