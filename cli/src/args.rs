//! A tiny flag parser shared by the subcommands: `--name value`,
//! `--name=value` and boolean `--name`. Each subcommand takes the flags it
//! knows, then `finish` rejects whatever is left, naming it.

use std::str::FromStr;

pub struct Args {
    rest: Vec<String>,
}

impl Args {
    pub fn new(args: impl IntoIterator<Item = String>) -> Self {
        Args {
            rest: args.into_iter().collect(),
        }
    }

    /// True when `-h` or `--help` was given.
    pub fn help(&mut self) -> bool {
        let before = self.rest.len();
        self.rest.retain(|a| a != "-h" && a != "--help");
        before != self.rest.len()
    }

    /// The value of `--name` (the last one when repeated), removed from the list.
    pub fn value(&mut self, name: &str) -> Result<Option<String>, String> {
        let flag = format!("--{name}");
        let inline = format!("--{name}=");
        let mut found = None;
        let mut i = 0;
        while i < self.rest.len() {
            if self.rest[i] == flag {
                if i + 1 >= self.rest.len() {
                    return Err(format!("{flag} needs a value"));
                }
                found = Some(self.rest.remove(i + 1));
                self.rest.remove(i);
            } else if let Some(v) = self.rest[i].strip_prefix(&inline) {
                found = Some(v.to_string());
                self.rest.remove(i);
            } else {
                i += 1;
            }
        }
        Ok(found)
    }

    /// `--name` parsed as `T`.
    pub fn parsed<T: FromStr>(&mut self, name: &str) -> Result<Option<T>, String>
    where
        T::Err: std::fmt::Display,
    {
        match self.value(name)? {
            None => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|e| format!("--{name} `{v}`: {e}")),
        }
    }

    /// A boolean `--name`.
    pub fn switch(&mut self, name: &str) -> bool {
        let flag = format!("--{name}");
        let before = self.rest.len();
        self.rest.retain(|a| *a != flag);
        before != self.rest.len()
    }

    /// The arguments that are not flags, in order, removed from the list.
    /// Call it after taking every flag that has a value.
    pub fn positional(&mut self) -> Vec<String> {
        let (flags, plain): (Vec<String>, Vec<String>) =
            self.rest.drain(..).partition(|a| a.starts_with('-'));
        self.rest = flags;
        plain
    }

    /// Fails on anything not taken.
    pub fn finish(self) -> Result<(), String> {
        match self.rest.first() {
            None => Ok(()),
            Some(a) => Err(format!("unknown argument `{a}`")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Args {
        Args::new(s.split_whitespace().map(String::from))
    }

    #[test]
    fn values_switches_and_leftovers() {
        let mut a = args("--users 5 --rate=2.5 --cache-off --users 7 --bogus");
        assert_eq!(a.parsed::<u32>("users").unwrap(), Some(7));
        assert_eq!(a.parsed::<f64>("rate").unwrap(), Some(2.5));
        assert!(a.switch("cache-off"));
        assert!(!a.switch("cache-off"));
        assert_eq!(a.value("missing").unwrap(), None);
        assert!(a.finish().unwrap_err().contains("--bogus"));
        assert!(args("--users").value("users").is_err());
        assert!(args("--users x").parsed::<u32>("users").is_err());
        assert!(args("-h").help());
    }
}
