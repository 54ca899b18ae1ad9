//! "Did you mean ...?" for misspelt keys and values.

/// Names people reach for from other tools, mapped to ours. Only offered
/// when the target is valid where the unknown key was found.
const ALIASES: &[(&str, &str)] = &[
    ("cmd", "command"),
    ("run", "command"),
    ("exec", "command"),
    ("type", "kind"),
    ("replicas", "count"),
    ("instances", "count"),
    ("scale", "count"),
    ("desired_count", "count"),
    ("signal", "stop_signal"),
    ("kill_signal", "stop_signal"),
    ("grace_period", "stop_timeout"),
    ("kill_timeout", "stop_timeout"),
    ("deregistration_delay", "drain_timeout"),
    ("readiness_delay", "ready_after"),
    ("healthcheck", "health"),
    ("health_check", "health"),
    ("healthchecks", "health"),
    ("environment", "env"),
    ("vars", "env"),
    ("variables", "env"),
    ("process", "processes"),
    ("procs", "processes"),
    ("name", "app"),
    ("service", "app"),
    ("bind", "listen"),
    ("address", "listen"),
    ("addr", "listen"),
    ("port", "listen"),
    ("release_command", "tasks"),
    ("commands", "tasks"),
    ("keep_releases", "retain_releases"),
    ("success_codes", "expect_status"),
    ("matcher", "expect_status"),
    ("status", "expect_status"),
    ("url", "path"),
    ("period", "interval"),
    ("deploy_timeout", "health_timeout"),
    ("surge", "max_surge"),
    ("unavailable", "max_unavailable"),
    ("max_attempts", "crash_loop_after"),
    ("canary_steps", "canary"),
    ("canary_percentages", "canary"),
    ("steps", "canary"),
    ("canary_window", "canary_hold"),
    ("canary_bake_time", "canary_hold"),
];

/// Edit distance over characters, counting a swap of two neighbours as
/// one edit (optimal string alignment): "paht" is one edit from "path".
pub fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    // d[i][j]: distance between a[..i] and b[..j].
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1).min(d[i][j - 1] + 1).min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

/// The closest valid name to `unknown`, if any is close enough: same name
/// in another case or with '-' for '_', a known alias, or a small typo
/// (at most one edit per three characters).
pub fn did_you_mean<'a>(unknown: &str, valid: &[&'a str]) -> Option<&'a str> {
    let normal = unknown.to_ascii_lowercase().replace('-', "_");
    if let Some(exact) = valid.iter().find(|v| **v == normal) {
        return Some(exact);
    }
    if let Some((_, to)) = ALIASES.iter().find(|(from, _)| *from == normal) {
        if let Some(target) = valid.iter().find(|v| *v == to) {
            return Some(target);
        }
    }
    let budget = (normal.chars().count() / 3).max(1);
    valid
        .iter()
        .map(|v| (edit_distance(&normal, v), *v))
        .filter(|(d, _)| *d <= budget)
        .min_by_key(|(d, _)| *d)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEYS: &[&str] = &["command", "kind", "count", "stop_signal", "health"];

    #[test]
    fn distances() {
        assert_eq!(edit_distance("", ""), 0);
        assert_eq!(edit_distance("comand", "command"), 1);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("abc", ""), 3);
        assert_eq!(edit_distance("paht", "path"), 1);
        assert_eq!(edit_distance("wbe", "web"), 1);
    }

    #[test]
    fn suggestions() {
        assert_eq!(did_you_mean("comand", KEYS), Some("command"));
        assert_eq!(did_you_mean("Command", KEYS), Some("command"));
        assert_eq!(did_you_mean("stop-signal", KEYS), Some("stop_signal"));
        assert_eq!(did_you_mean("cmd", KEYS), Some("command"));
        assert_eq!(did_you_mean("healthcheck", KEYS), Some("health"));
        assert_eq!(did_you_mean("replicas", KEYS), Some("count"));
        assert_eq!(did_you_mean("kinds", KEYS), Some("kind"));
        assert_eq!(did_you_mean("xyzzy", KEYS), None);
        // An alias whose target is not valid here is not offered.
        assert_eq!(did_you_mean("port", KEYS), None);
        assert_eq!(did_you_mean("port", &["listen"]), Some("listen"));
    }
}
