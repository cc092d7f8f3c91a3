//! The flags every Gantry binary takes for the shared settings, defined once: `--config`,
//! `--amqp-url`, `--database-url` and `--prefix`, as [`GlobalArgs`] to flatten into a
//! binary's own `clap` arguments.
//!
//! Only with the `cli` feature, which the binaries enable: a backend that links the client
//! library does not compile `clap`.
//!
//! The flags are the last layer of the configuration: defaults, then the file, then the
//! `GANTRY_*` environment variables ([`Config::load`]), then these flags
//! ([`GlobalArgs::apply_to`]). The URLs have no `env` of their own on purpose: the
//! environment is read once, by [`Config::load`], with the rule that an empty variable
//! counts as unset.

use std::convert::Infallible;
use std::path::{Path, PathBuf};

use clap::builder::{OsStringValueParser, TypedValueParser};
use secrecy::SecretString;

use crate::Result;
use crate::config::{Config, DEFAULT_AMQP_URL, DEFAULT_DATABASE_URL};

/// `--config`, `--amqp-url`, `--database-url` and `--prefix`.
///
/// Flatten it with `#[command(flatten)]`. `gantry`, whose subcommands take the flags too,
/// marks them global (`mut_arg(…, |a| a.global(true))` on its command) and puts them under
/// a heading of their own.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct GlobalArgs {
    /// YAML configuration file (keys: amqp_url, database_url, prefix, broker_timeout, …)
    #[arg(
        long,
        env = "GANTRY_CONFIG",
        hide_env_values = true,
        value_name = "FILE",
        value_parser = any_path()
    )]
    pub config: Option<PathBuf>,

    #[arg(
        long,
        value_name = "URL",
        value_parser = secret,
        help = format!("RabbitMQ URL; overrides GANTRY_AMQP_URL [default: {DEFAULT_AMQP_URL}]")
    )]
    pub amqp_url: Option<SecretString>,

    #[arg(
        long,
        value_name = "URL",
        value_parser = secret,
        help = format!("Postgres URL; overrides GANTRY_DATABASE_URL [default: {DEFAULT_DATABASE_URL}]")
    )]
    pub database_url: Option<SecretString>,

    /// Prefix of every exchange and queue name; overrides GANTRY_PREFIX [default: gantry]
    #[arg(long, value_name = "PREFIX")]
    pub prefix: Option<String>,
}

impl GlobalArgs {
    /// The configuration file, if one is named: `--config` or `GANTRY_CONFIG`, an empty value
    /// counting as none (as an empty `GANTRY_*` variable does).
    pub fn config_file(&self) -> Option<&Path> {
        self.config.as_deref().filter(|p| !p.as_os_str().is_empty())
    }

    /// Sets in `config` what these flags give, leaving the rest as it is.
    pub fn apply_to(&self, config: &mut Config) {
        if let Some(url) = &self.amqp_url {
            config.amqp_url.clone_from(url);
        }
        if let Some(url) = &self.database_url {
            config.database_url.clone_from(url);
        }
        if let Some(prefix) = &self.prefix {
            config.prefix.clone_from(prefix);
        }
    }

    /// The whole configuration: defaults, then the file, then `GANTRY_*` (that is
    /// [`Config::load`]), then these flags.
    ///
    /// # Errors
    /// As [`Config::load`]: the file cannot be read or parsed, or a `GANTRY_*` variable has a
    /// bad value.
    pub fn load(&self) -> Result<Config> {
        let mut config = Config::load(self.config_file())?;
        self.apply_to(&mut config);
        // A URL given by flag gets the CA file too, as one from the file or environment does.
        config.apply_tls_ca_file()?;
        Ok(config)
    }
}

/// A path that may be empty (an empty `GANTRY_CONFIG` counts as unset, see
/// [`GlobalArgs::config_file`]); clap's own path parser refuses an empty value.
fn any_path() -> impl TypedValueParser<Value = PathBuf> {
    OsStringValueParser::new().map(PathBuf::from)
}

/// A URL that may carry a password: kept out of `Debug` output from the moment it is parsed.
fn secret(s: &str) -> Result<SecretString, Infallible> {
    Ok(s.into())
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};
    use secrecy::ExposeSecret;

    use super::*;

    #[derive(Debug, Parser)]
    struct Binary {
        #[command(flatten)]
        global: GlobalArgs,
    }

    #[test]
    fn the_flags_are_well_formed() {
        Binary::command().debug_assert();
    }

    #[test]
    fn flags_win_over_what_was_loaded_and_leave_the_rest() {
        let args = Binary::try_parse_from([
            "binary",
            "--amqp-url",
            "amqp://u:p@broker:5672/%2f",
            "--database-url",
            "postgres://u:p@db/gantry",
            "--prefix",
            "flagged",
        ])
        .unwrap()
        .global;
        let mut config = Config {
            prefix: "from-the-file".into(),
            db_pool_size: 3,
            ..Config::default()
        };
        args.apply_to(&mut config);
        assert_eq!(
            config.amqp_url.expose_secret(),
            "amqp://u:p@broker:5672/%2f"
        );
        assert_eq!(
            config.database_url.expose_secret(),
            "postgres://u:p@db/gantry"
        );
        assert_eq!(config.prefix, "flagged");
        assert_eq!(config.db_pool_size, 3);

        let mut untouched = Config::default();
        GlobalArgs::default().apply_to(&mut untouched);
        assert_eq!(untouched.prefix, "gantry");
    }

    #[test]
    fn an_empty_config_path_names_no_file() {
        let args = Binary::try_parse_from(["binary", "--config", ""])
            .unwrap()
            .global;
        assert_eq!(args.config_file(), None);
    }

    #[test]
    fn passwords_stay_out_of_debug_output() {
        let args =
            Binary::try_parse_from(["binary", "--database-url", "postgres://u:hunter2@db/x"])
                .unwrap()
                .global;
        assert!(!format!("{args:?}").contains("hunter2"));
    }

    #[test]
    fn the_help_names_the_variables_and_the_defaults() {
        let help = Binary::command().render_long_help().to_string();
        assert!(help.contains(&format!(
            "overrides GANTRY_AMQP_URL [default: {DEFAULT_AMQP_URL}]"
        )));
        assert!(help.contains(&format!(
            "overrides GANTRY_DATABASE_URL [default: {DEFAULT_DATABASE_URL}]"
        )));
        assert!(help.contains("[env: GANTRY_CONFIG]"), "{help}");
    }
}
