//! `dataviz user`: the admin site's users: add, list, change a password.
//!
//! Passwords are read from a prompt (no echo) on a terminal, or as one line of standard input
//! otherwise (`echo "$PASSWORD" | dataviz user add ...`): never from the command line, where
//! other users of the machine could read them.

use anyhow::Context as _;
use dataviz_app::users::{self, ROLE_ADMIN};
use dataviz_core::config::DatabaseConfig;
use dataviz_core::db;
use std::io::{BufRead, IsTerminal};

#[derive(Debug, clap::Args)]
pub struct UserArgs {
    #[command(flatten)]
    database: DatabaseConfig,
    #[command(subcommand)]
    command: UserCommand,
}

#[derive(Debug, clap::Subcommand)]
enum UserCommand {
    /// Creates a user; the password is prompted for (or read from stdin).
    Add {
        email: String,
        /// Gives the user ROLE_ADMIN: the admin site is theirs.
        #[arg(long)]
        admin: bool,
    },
    /// Lists the users and their roles.
    List,
    /// Sets a user's password (their other sessions end).
    Passwd { email: String },
}

/// A password from the terminal (asked twice) or from one line of stdin.
fn read_password() -> anyhow::Result<String> {
    if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password("Password: ").context("reading the password")?;
        let again = rpassword::prompt_password("Password again: ")?;
        anyhow::ensure!(first == again, "the two passwords differ");
        Ok(first)
    } else {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("reading the password from stdin")?;
        Ok(line.trim_end_matches(['\r', '\n']).to_owned())
    }
}

pub async fn run(args: UserArgs) -> anyhow::Result<()> {
    let client = db::connect(&args.database.database_url).await?;
    db::check_migrated(&client).await?;
    match args.command {
        UserCommand::Add { email, admin } => {
            let password = read_password()?;
            let roles: Vec<String> = if admin {
                vec![ROLE_ADMIN.to_owned()]
            } else {
                Vec::new()
            };
            let user = users::create(&client, &email, &password, &roles).await?;
            println!(
                "User {} created{}.",
                user.email,
                if admin { " (ROLE_ADMIN)" } else { "" }
            );
        }
        UserCommand::List => {
            let all = users::list(&client).await?;
            if all.is_empty() {
                println!("No users. Create the first admin with: dataviz user add EMAIL --admin");
            }
            for user in all {
                println!("{}\t{}", user.email, user.roles.join(","));
            }
        }
        UserCommand::Passwd { email } => {
            let password = read_password()?;
            users::set_password(&client, &email, &password).await?;
            println!("Password of {email} changed.");
        }
    }
    Ok(())
}
