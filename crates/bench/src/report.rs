//! The results of a run: rows (each beside its baseline), targets, context, and the
//! markdown they print as.
use std::fmt::Write as _;

/// One measured figure and, where it has one, the raw baseline measured in the same run.
#[derive(Debug, Clone)]
pub struct Row {
    /// A stable key for the text that refers to the figure.
    pub key: &'static str,
    pub section: &'static str,
    pub what: String,
    pub value: f64,
    pub unit: &'static str,
    pub baseline: Option<(String, f64)>,
    pub note: String,
}

impl Row {
    pub fn ratio(&self) -> Option<f64> {
        self.baseline
            .as_ref()
            .filter(|(_, b)| *b > 0.0)
            .map(|(_, b)| self.value / b)
    }
}

#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub pass: bool,
    pub detail: String,
}

#[derive(Debug, Default)]
pub struct Report {
    pub rows: Vec<Row>,
    pub targets: Vec<Target>,
    /// "key: value" lines about settings and conditions.
    pub context: Vec<(String, String)>,
    /// Free-form observations gathered while measuring (numbers included).
    pub notes: Vec<String>,
    /// The phase being measured (`storage`, `replay`, …), set by `main` before each.
    pub phase: &'static str,
    /// The phase each row, target and note was recorded in, by index.
    pub row_phases: Vec<&'static str>,
    pub target_phases: Vec<&'static str>,
    pub note_phases: Vec<&'static str>,
    /// Latency against offered load, from the end-to-end phase (plotted by `main`).
    pub curve: Vec<crate::plot::LoadPoint>,
}

impl Report {
    pub fn add(&mut self, row: Row) {
        self.row_phases.push(self.phase);
        let ratio = row
            .ratio()
            .map_or_else(String::new, |r| format!("  ({} baseline)", fmt_ratio(r)));
        eprintln!(
            "  {:<55} {:>12} {}{}",
            row.what,
            fmt_value(row.value),
            row.unit,
            ratio
        );
        self.rows.push(row);
    }

    pub fn get(&self, key: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.key == key)
    }

    pub fn value(&self, key: &str) -> Option<f64> {
        self.get(key).map(|r| r.value)
    }

    pub fn target(&mut self, name: impl Into<String>, pass: bool, detail: impl Into<String>) {
        let target = Target {
            name: name.into(),
            pass,
            detail: detail.into(),
        };
        eprintln!(
            "  target {}: {} ({})",
            target.name,
            if pass { "PASS" } else { "FAIL" },
            target.detail
        );
        self.targets.push(target);
        self.target_phases.push(self.phase);
    }

    pub fn context(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.context.push((key.into(), value.into()));
    }

    pub fn note(&mut self, note: impl Into<String>) {
        let note = note.into();
        eprintln!("  note: {note}");
        self.notes.push(note);
        self.note_phases.push(self.phase);
    }

    pub const TABLE_HEADER: &'static str = "| section | measurement | value | raw baseline (same run) | baseline | ratio | notes |\n| --- | --- | ---: | --- | ---: | ---: | --- |\n";
    pub const TARGETS_HEADER: &'static str =
        "| target | result | measured |\n| --- | --- | --- |\n";

    /// One row of the results table (markdown, without the newline).
    pub fn row_line(row: &Row) -> String {
        let (bname, bvalue) = match &row.baseline {
            Some((name, value)) => (name.clone(), format!("{} {}", fmt_value(*value), row.unit)),
            None => ("—".to_owned(), "—".to_owned()),
        };
        let ratio = row.ratio().map_or_else(|| "—".to_owned(), fmt_ratio);
        format!(
            "| {} | {} | {} {} | {} | {} | {} | {} |",
            row.section,
            row.what,
            fmt_value(row.value),
            row.unit,
            bname,
            bvalue,
            ratio,
            row.note
        )
    }

    /// One row of the targets table (markdown, without the newline).
    pub fn target_line(t: &Target) -> String {
        format!(
            "| {} | {} | {} |",
            t.name,
            if t.pass { "**pass**" } else { "**FAIL**" },
            t.detail
        )
    }

    /// The results table (markdown).
    pub fn table(&self) -> String {
        let mut out = String::from(Self::TABLE_HEADER);
        for row in &self.rows {
            let _ = writeln!(out, "{}", Self::row_line(row));
        }
        out
    }

    pub fn targets_table(&self) -> String {
        let mut out = String::from(Self::TARGETS_HEADER);
        for t in &self.targets {
            let _ = writeln!(out, "{}", Self::target_line(t));
        }
        out
    }
}

/// A ratio with two significant digits at least (0.0048× rather than 0.00×).
pub fn fmt_ratio(r: f64) -> String {
    if r >= 0.1 {
        format!("{r:.2}×")
    } else {
        format!("{r:.4}×")
    }
}

/// Numbers as people read them: thousands separated, 3 significant digits below 100.
pub fn fmt_value(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".to_owned();
    }
    if v.abs() >= 100.0 {
        let n = v.round() as i64;
        let digits = n.abs().to_string();
        let mut grouped = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                grouped.push(',');
            }
            grouped.push(c);
        }
        if n < 0 {
            format!("-{grouped}")
        } else {
            grouped
        }
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_print_readably() {
        assert_eq!(fmt_value(1_234_567.4), "1,234,567");
        assert_eq!(fmt_value(512.0), "512");
        assert_eq!(fmt_value(12.345), "12.3");
        assert_eq!(fmt_value(1.234), "1.23");
    }
}
