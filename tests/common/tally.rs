//! One run of a reliability scenario, as `scripts/reliability.sh` adds it up: a `tally:` line
//! printed by a run that passed, after the assertions that make its counts true.

#[derive(Default)]
pub struct Tally {
    pub commands: usize,
    pub lost: usize,
    /// Commands run twice, or whose result was announced twice.
    pub duplicated: usize,
    pub corrupt: usize,
    pub orphaned: usize,
    pub panics: usize,
    /// Workers that had to be restarted by hand (a killed worker replaced, as a supervisor
    /// would, does not count).
    pub restarts: usize,
}

impl Tally {
    /// Prints `tally: <scenario> | commands=… lost=… … | <figure>`.
    pub fn print(&self, scenario: &str, figure: &str) {
        eprintln!(
            "tally: {scenario} | commands={} lost={} duplicated={} corrupt={} orphaned={} panics={} restarts={} | {figure}",
            self.commands,
            self.lost,
            self.duplicated,
            self.corrupt,
            self.orphaned,
            self.panics,
            self.restarts
        );
    }
}
