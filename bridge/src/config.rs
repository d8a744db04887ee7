//! Bridge settings, from the environment (the original's `MQTT_*` names).

use rumqttc::{MqttOptions, QoS, TlsConfiguration, Transport};
use std::path::PathBuf;
use std::time::Duration;

/// How to reach the MQTT broker; shared by the bridge and the simulator.
#[derive(Debug, Clone, clap::Args)]
pub struct MqttConnection {
    /// MQTT broker host.
    #[arg(
        long,
        env = "MQTT_HOST",
        value_name = "MQTT_HOST",
        default_value = "127.0.0.1"
    )]
    pub mqtt_host: String,
    /// MQTT broker port.
    #[arg(
        long,
        env = "MQTT_PORT",
        value_name = "MQTT_PORT",
        default_value_t = 1883
    )]
    pub mqtt_port: u16,
    /// MQTT user name.
    #[arg(long, env = "MQTT_USERNAME", value_name = "MQTT_USERNAME")]
    pub mqtt_username: Option<String>,
    /// MQTT password.
    #[arg(
        long,
        env = "MQTT_PASSWORD",
        value_name = "MQTT_PASSWORD",
        hide_env_values = true
    )]
    pub mqtt_password: Option<String>,
    /// Connect with TLS.
    #[arg(long, env = "MQTT_TLS", value_name = "MQTT_TLS", default_value_t = false, action = clap::ArgAction::Set)]
    pub mqtt_tls: bool,
    /// CA certificate (PEM) to verify the broker; the system's roots when unset.
    #[arg(long, env = "MQTT_TLS_CA", value_name = "MQTT_TLS_CA")]
    pub mqtt_tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS (with MQTT_TLS_KEY).
    #[arg(
        long,
        env = "MQTT_TLS_CERT",
        value_name = "MQTT_TLS_CERT",
        requires = "mqtt_tls_key"
    )]
    pub mqtt_tls_cert: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS.
    #[arg(
        long,
        env = "MQTT_TLS_KEY",
        value_name = "MQTT_TLS_KEY",
        requires = "mqtt_tls_cert"
    )]
    pub mqtt_tls_key: Option<PathBuf>,
    /// Keep-alive interval.
    #[arg(long, env = "MQTT_KEEP_ALIVE", value_name = "MQTT_KEEP_ALIVE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub mqtt_keep_alive: Duration,
    /// Largest MQTT packet accepted, in bytes (keep it above the broker's max_packet_size).
    #[arg(long, env = "MQTT_MAX_PACKET_SIZE", value_name = "MQTT_MAX_PACKET_SIZE", default_value_t = 4 * 1024 * 1024)]
    pub mqtt_max_packet_size: usize,
}

impl MqttConnection {
    /// rumqttc options for this broker and client id.
    pub fn options(&self, client_id: &str) -> anyhow::Result<MqttOptions> {
        let mut options = MqttOptions::new(client_id, &self.mqtt_host, self.mqtt_port);
        options.set_keep_alive(self.mqtt_keep_alive.max(Duration::from_secs(5)));
        options.set_max_packet_size(self.mqtt_max_packet_size, self.mqtt_max_packet_size);
        if let Some(user) = &self.mqtt_username {
            options.set_credentials(user, self.mqtt_password.clone().unwrap_or_default());
        }
        if self.mqtt_tls {
            let transport = match &self.mqtt_tls_ca {
                None if self.mqtt_tls_cert.is_none() => Transport::tls_with_default_config(),
                _ => {
                    let read = |path: &PathBuf, var: &str| {
                        std::fs::read(path)
                            .map_err(|e| anyhow::anyhow!("{var} {}: {e}", path.display()))
                    };
                    let ca = match &self.mqtt_tls_ca {
                        Some(path) => read(path, "MQTT_TLS_CA")?,
                        None => anyhow::bail!("MQTT_TLS_CERT needs MQTT_TLS_CA"),
                    };
                    let client_auth = match (&self.mqtt_tls_cert, &self.mqtt_tls_key) {
                        (Some(cert), Some(key)) => {
                            Some((read(cert, "MQTT_TLS_CERT")?, read(key, "MQTT_TLS_KEY")?))
                        }
                        _ => None,
                    };
                    Transport::tls_with_config(TlsConfiguration::Simple {
                        ca,
                        alpn: None,
                        client_auth,
                    })
                }
            };
            options.set_transport(transport);
        }
        Ok(options)
    }
}

/// What the bridge subscribes to and how.
#[derive(Debug, Clone, clap::Args)]
pub struct BridgeConfig {
    #[command(flatten)]
    pub mqtt: MqttConnection,
    /// Topic filters to subscribe to, comma or space separated.
    #[arg(long, env = "MQTT_TOPICS", value_name = "MQTT_TOPICS", default_value = "gateways/+/+", value_parser = parse_topics)]
    pub mqtt_topics: Topics,
    /// Subscription QoS: 1 (at least once, the default: nothing lost), 0 or 2.
    #[arg(long, env = "MQTT_QOS", value_name = "MQTT_QOS", default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub mqtt_qos: u8,
    /// Fixed client id: the broker keeps the bridge's session (and queues its messages) under it.
    #[arg(
        long,
        env = "MQTT_CLIENT_ID",
        value_name = "MQTT_CLIENT_ID",
        default_value = "dataviz-bridge"
    )]
    pub mqtt_client_id: String,
    /// Messages received from MQTT and not yet stored in JetStream, at most.
    #[arg(
        long,
        env = "BRIDGE_MAX_IN_FLIGHT",
        value_name = "BRIDGE_MAX_IN_FLIGHT",
        default_value_t = 4096
    )]
    pub bridge_max_in_flight: usize,
    /// Bytes of payload received from MQTT and not yet stored in JetStream, at most: with
    /// BRIDGE_MAX_IN_FLIGHT, what bounds the bridge's memory whatever the payloads' size.
    #[arg(
        long,
        env = "BRIDGE_MAX_IN_FLIGHT_BYTES",
        value_name = "BRIDGE_MAX_IN_FLIGHT_BYTES",
        default_value_t = 64 * 1024 * 1024
    )]
    pub bridge_max_in_flight_bytes: usize,
}

impl BridgeConfig {
    pub fn qos(&self) -> QoS {
        qos(self.mqtt_qos)
    }
}

/// The QoS of a level read from the command line (0, 1 or 2; 1 for anything else).
pub fn qos(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        2 => QoS::ExactlyOnce,
        _ => QoS::AtLeastOnce,
    }
}

/// Topic filters, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics(pub Vec<String>);

/// Splits `MQTT_TOPICS` on commas and white space, and checks each filter.
pub fn parse_topics(s: &str) -> Result<Topics, String> {
    let topics: Vec<String> = s
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect();
    if topics.is_empty() {
        return Err("no topic filter given".into());
    }
    for topic in &topics {
        let levels: Vec<&str> = topic.split('/').collect();
        for (i, level) in levels.iter().enumerate() {
            let wildcard_misused = (level.contains('+') && *level != "+")
                || (level.contains('#') && (*level != "#" || i != levels.len() - 1));
            if wildcard_misused {
                return Err(format!(
                    "{topic:?} is not a valid topic filter (+ and # must stand alone in a level, # last)"
                ));
            }
        }
    }
    Ok(Topics(topics))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_split_on_commas_and_spaces() {
        assert_eq!(
            parse_topics("gateways/+/+, a/#  b/c").unwrap(),
            Topics(vec!["gateways/+/+".into(), "a/#".into(), "b/c".into()])
        );
        assert_eq!(
            parse_topics("$share/dataviz/gateways/+/+").unwrap().0.len(),
            1
        );
    }

    #[test]
    fn bad_filters_are_refused() {
        for bad in ["", " , ", "a/#/b", "a+/b", "a/b#"] {
            assert!(parse_topics(bad).is_err(), "{bad:?}");
        }
    }
}
