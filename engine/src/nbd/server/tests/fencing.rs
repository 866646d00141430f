//! Exports fenced and removed at run time: their connections end, new ones are refused,
//! and nothing written after the fence reaches the volume.

use std::time::Duration;

use super::raw_client::TestResult;
use super::{fixture, is_closed, MIB};
use crate::nbd::protocol::*;
use crate::nbd::server::{ExportConfig, ServerError, ServerOptions};

#[test]
fn a_fence_closes_connections_and_refuses_new_ones() -> TestResult {
    let f = fixture(MIB, false, ServerOptions::default())?;
    let mut c = f.session(false)?;
    c.write(1, 0, &[4u8; 512], 0)?;
    assert_eq!(c.simple_reply()?.error, 0);
    f.server.fence_export("v", Duration::from_secs(10))?;
    // The connection is gone: a write after the fence never reaches the volume.
    let _ = c.write(2, 512, &[5u8; 512], 0);
    assert!(is_closed(&mut c.s));
    assert!(f.image_bytes()?[512..1024].iter().all(|&b| b == 0));
    let status = f.server.export_status("v").ok_or("no status")?;
    assert!(status.fenced && status.connections == 0, "{status:?}");
    let mut late = f.client()?;
    let request = ExportRequest {
        export_name: "v".into(),
        info_types: vec![],
    };
    assert_eq!(
        late.option_result(NBD_OPT_GO, &request.encode()?)?,
        NBD_REP_ERR_POLICY
    );
    Ok(())
}

#[test]
fn a_removed_export_is_unknown_and_its_name_free_again() -> TestResult {
    let f = fixture(MIB, false, ServerOptions::default())?;
    let mut c = f.session(true)?;
    assert_eq!(f.server.exports().len(), 1);
    f.server.remove_export("v", Duration::from_secs(10))?;
    assert!(is_closed(&mut c.s));
    assert!(f.server.exports().is_empty());
    let mut late = f.client()?;
    let request = ExportRequest {
        export_name: "v".into(),
        info_types: vec![],
    };
    assert_eq!(
        late.option_result(NBD_OPT_GO, &request.encode()?)?,
        NBD_REP_ERR_UNKNOWN
    );
    assert!(matches!(
        f.server.remove_export("v", Duration::ZERO),
        Err(ServerError::NoExport(_))
    ));
    let again = ExportConfig {
        name: "v".into(),
        volume: f.volume.clone(),
        read_only: false,
        description: String::new(),
        clients: None,
    };
    f.server.add_export(again.clone())?;
    assert!(matches!(
        f.server.add_export(again),
        Err(ServerError::ExportExists(_))
    ));
    let mut back = f.session(false)?;
    back.request(NBD_CMD_FLUSH, 0, 1, 0, 0)?;
    assert_eq!(back.simple_reply()?.error, 0);
    Ok(())
}
