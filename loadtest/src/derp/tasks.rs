//! The tasks of a packet run: a sender (open loop, rate-limited or windowed), a receiver's echo
//! writer, and the reader every client runs. Their state types live in the parent module.

use super::*;

impl SenderTask {
    pub(super) async fn run(mut self, mut wr: WriteHalf<BoxIo>) -> std::io::Result<SendStats> {
        let mut st = SendStats::default();
        let frame_len = proto::FRAME_HEADER_LEN + KEY_LEN + self.size;
        let batch = (BATCH_BYTES / frame_len).max(1) as u64;
        let mut out = BytesMut::with_capacity(batch as usize * frame_len);
        let mut seq: u64 = 0;
        loop {
            let now = Instant::now();
            if now >= self.clock.stop_at {
                break;
            }
            let n = if let Some((ctl, w)) = self.window.as_mut() {
                match ctl.step(seq, w.read_to.load(Ordering::Acquire), now) {
                    Step::Send(k) => k.min(batch),
                    Step::WaitUntil(deadline) => {
                        tokio::select! {
                            _ = w.notify.notified() => {}
                            _ = tokio::time::sleep_until(deadline.min(self.clock.stop_at).into()) => {}
                            _ = self.finish.changed() => return Ok(st),
                        }
                        continue;
                    }
                }
            } else if self.rate > 0.0 {
                let due = (now.duration_since(self.clock.epoch).as_secs_f64() * self.rate) as u64;
                if due <= seq {
                    let next =
                        self.clock.epoch + Duration::from_secs_f64((seq + 1) as f64 / self.rate);
                    tokio::select! {
                        _ = tokio::time::sleep_until(next.min(self.clock.stop_at).into()) => {}
                        _ = self.finish.changed() => return Ok(st),
                    }
                    continue;
                }
                (due - seq).min(batch)
            } else {
                batch
            };
            let ts = self.clock.ns(now);
            for _ in 0..n {
                put_packet(&mut out, &self.dst, KIND_DATA, seq, ts, self.size);
                seq += 1;
            }
            tokio::select! {
                r = wr.write_all(&out) => r?,
                _ = self.finish.changed() => return Ok(st),
            }
            out.clear();
            st.sent += n;
            if self.clock.in_window(now) {
                st.sent_in_window += n;
            }
        }
        if let Some((ctl, _)) = &self.window {
            st.window_timeouts = ctl.timeouts;
            st.written_off = ctl.written_off;
        }
        // 1. Ping: its Pong proves the relay has read all we sent.
        ping_and_wait(&mut wr, &mut self.pongs, &mut self.finish).await?;
        // 2. When every sender is there, the end marker.
        tokio::select! {
            _ = self.barrier.wait() => {}
            _ = self.finish.changed() => return Ok(st),
        }
        if self.end_marker {
            put_packet(
                &mut out,
                &self.dst,
                KIND_END,
                seq,
                self.clock.ns(Instant::now()),
                self.size,
            );
            wr.write_all(&out).await?;
            wr.flush().await?;
        }
        // Keep the connection open until the run ends.
        let _ = self.finish.wait_for(|x| *x).await;
        Ok(st)
    }
}
pub(super) async fn ping_and_wait(
    wr: &mut WriteHalf<BoxIo>,
    pongs: &mut mpsc::Receiver<()>,
    finish: &mut watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(13);
    proto::put_frame(&mut out, ft::PING, &[b"flt-done"]);
    wr.write_all(&out).await?;
    wr.flush().await?;
    tokio::select! {
        p = pongs.recv() => {
            p.ok_or_else(|| std::io::Error::other("connection closed while waiting for the relay's Pong"))
        }
        _ = finish.changed() => Ok(()),
    }
}
impl EchoTask {
    pub(super) async fn run(mut self, mut wr: WriteHalf<BoxIo>) -> std::io::Result<SendStats> {
        let mut st = SendStats::default();
        let mut out = BytesMut::with_capacity(2 * BATCH_BYTES);
        let mut ended = false;
        while !ended {
            let first = tokio::select! {
                m = self.rx.recv() => m,
                _ = self.finish.changed() => return Ok(st),
            };
            let Some(mut msg) = first else {
                return Ok(st);
            };
            let now = Instant::now();
            loop {
                match msg {
                    Echo::Packet { to, packet } => {
                        proto::put_header(&mut out, ft::SEND_PACKET, KEY_LEN + packet.len());
                        out.put_slice(to.as_bytes());
                        let at = out.len();
                        out.put_slice(&packet);
                        out[at + 4] = KIND_ECHO;
                        st.sent += 1;
                        if self.clock.in_window(now) {
                            st.sent_in_window += 1;
                        }
                    }
                    Echo::End => {
                        ended = true;
                        break;
                    }
                }
                if out.len() >= BATCH_BYTES {
                    break;
                }
                match self.rx.try_recv() {
                    Ok(m) => msg = m,
                    Err(_) => break,
                }
            }
            tokio::select! {
                r = wr.write_all(&out) => r?,
                _ = self.finish.changed() => return Ok(st),
            }
            out.clear();
        }
        // All echoes are written: Ping so the relay has read them, then end markers.
        ping_and_wait(&mut wr, &mut self.pongs, &mut self.finish).await?;
        let ts = self.clock.ns(Instant::now());
        for s in &self.senders {
            put_packet(&mut out, s, KIND_END_ACK, 0, ts, self.size);
        }
        wr.write_all(&out).await?;
        wr.flush().await?;
        let _ = self.finish.wait_for(|x| *x).await;
        Ok(st)
    }
}
impl Reader {
    pub(super) async fn run(
        mut self,
        mut rd: ReadHalf<BoxIo>,
        mut buf: BytesMut,
    ) -> std::io::Result<RecvStats> {
        let mut st = RecvStats::default();
        let mut dec = FrameDecoder::new();
        loop {
            let now = Instant::now();
            let in_window = self.clock.in_window(now);
            let mut delivered = 0u64;
            while let Some(f) = dec.decode(&mut buf).map_err(bad_data)? {
                match ServerFrame::parse(f).map_err(bad_data)? {
                    ServerFrame::RecvPacket { src, packet } => {
                        let Some((kind, seq, ts)) = parse_packet(&packet) else {
                            continue;
                        };
                        let sent_at = self.clock.epoch + Duration::from_nanos(ts);
                        let age = now.saturating_duration_since(sent_at);
                        match kind {
                            KIND_DATA => {
                                st.data += 1;
                                delivered += 1;
                                if let Some(&j) = self.window_keys.get(&src) {
                                    if self.window_of[j].read(seq) {
                                        self.window_dirty[j] = true;
                                    }
                                }
                                if in_window {
                                    st.data_in_window += 1;
                                    report::record(&mut st.one_way, age);
                                }
                                if let Some(echo) = &self.echo {
                                    let m = Echo::Packet { to: src, packet };
                                    tokio::select! {
                                        r = echo.send(m) => r.map_err(|_| std::io::Error::other("echo writer stopped"))?,
                                        _ = self.finish.changed() => return Ok(st),
                                    }
                                }
                            }
                            KIND_ECHO => {
                                st.echoes += 1;
                                delivered += 1;
                                if in_window {
                                    st.echoes_in_window += 1;
                                    report::record(&mut st.round_trip, age);
                                }
                            }
                            KIND_END => {
                                if let Some(echo) = &self.echo {
                                    let _ = echo.send(Echo::End).await;
                                }
                                if self.signal_end {
                                    let _ = self.done.send(());
                                }
                            }
                            KIND_END_ACK if self.signal_end => {
                                let _ = self.done.send(());
                            }
                            _ => {}
                        }
                    }
                    ServerFrame::Pong(_) => {
                        let _ = self.pong.try_send(());
                    }
                    // Until the run ends: once it has, the other clients close (a fan-in
                    // receiver may close while a sender still reads, which is no departure).
                    ServerFrame::PeerGone { .. } if now < self.clock.stop_at => st.peer_gone += 1,
                    _ => {}
                }
            }
            if delivered > 0 {
                self.meter.add(delivered, delivered * self.size as u64);
            }
            for (w, dirty) in self.window_of.iter().zip(self.window_dirty.iter_mut()) {
                if std::mem::take(dirty) {
                    w.notify.notify_one();
                }
            }
            buf.reserve(dec.bytes_needed(&buf).max(BATCH_BYTES));
            tokio::select! {
                r = rd.read_buf(&mut buf) => {
                    if r? == 0 {
                        if *self.finish.borrow() {
                            return Ok(st);
                        }
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "the relay closed the connection",
                        ));
                    }
                }
                _ = self.finish.changed() => return Ok(st),
            }
        }
    }
}
