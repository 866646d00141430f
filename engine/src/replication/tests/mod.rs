mod frame_golden;
mod primary;
mod receiver;
