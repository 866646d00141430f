mod frame_golden;
mod primary;
mod primary_lag;
mod receiver;
