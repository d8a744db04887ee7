//! The device topic: `gateways/<gateway_id>/<device_code>`.
//!
//! The gateway is identified by its integer primary key, the device by its code (unique per
//! gateway), as in the original system.

use thiserror::Error;

/// Longest device code accepted, in bytes.
pub const MAX_DEVICE_CODE_LEN: usize = 255;

/// A topic that names a gateway and a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceTopic<'a> {
    pub gateway_id: i32,
    pub device_code: &'a str,
}

/// Why a topic is not a device topic. Always permanent: the same topic never parses later.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TopicError {
    #[error("topic {0:?} is not of the form gateways/<gateway_id>/<device_id>")]
    Shape(String),
    #[error("gateway id {0:?} in the topic is not a positive integer")]
    GatewayId(String),
    #[error("device id in the topic is empty")]
    EmptyDevice,
    #[error("device id in the topic is longer than {MAX_DEVICE_CODE_LEN} bytes")]
    DeviceTooLong,
}

/// Parses `gateways/<gateway_id>/<device_code>`.
pub fn parse(topic: &str) -> Result<DeviceTopic<'_>, TopicError> {
    let mut levels = topic.split('/');
    let (Some("gateways"), Some(gateway), Some(device), None) =
        (levels.next(), levels.next(), levels.next(), levels.next())
    else {
        return Err(TopicError::Shape(topic.to_owned()));
    };
    let gateway_id = gateway
        .parse::<i32>()
        .ok()
        .filter(|id| *id > 0 && !gateway.starts_with('+'))
        .ok_or_else(|| TopicError::GatewayId(gateway.to_owned()))?;
    if device.is_empty() {
        return Err(TopicError::EmptyDevice);
    }
    if device.len() > MAX_DEVICE_CODE_LEN {
        return Err(TopicError::DeviceTooLong);
    }
    Ok(DeviceTopic {
        gateway_id,
        device_code: device,
    })
}

/// The gateway id of a topic when it has one, without validating the rest.
///
/// The bridge uses it to route raw messages to a per-gateway subject, so that a replay can
/// read one gateway's messages alone.
pub fn gateway_of(topic: &str) -> Option<i32> {
    parse(topic).ok().map(|t| t.gateway_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_original_shape() {
        assert_eq!(
            parse("gateways/12/dev-1").unwrap(),
            DeviceTopic {
                gateway_id: 12,
                device_code: "dev-1"
            }
        );
        assert_eq!(parse("gateways/1/a.b c").unwrap().device_code, "a.b c");
    }

    #[test]
    fn rejects_other_shapes() {
        for bad in [
            "",
            "gateways",
            "gateways/1",
            "gateways/1/",
            "gateways/1/d/extra",
            "/gateways/1/d",
            "gateway/1/d",
            "gateways/x/d",
            "gateways/0/d",
            "gateways/-3/d",
            "gateways/+1/d",
            "gateways/99999999999/d",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should be refused");
        }
        assert_eq!(parse("gateways/1/").unwrap_err(), TopicError::EmptyDevice);
        let long = format!("gateways/1/{}", "x".repeat(MAX_DEVICE_CODE_LEN + 1));
        assert_eq!(parse(&long).unwrap_err(), TopicError::DeviceTooLong);
    }
}
