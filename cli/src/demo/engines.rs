//! The seven engines of the platform, each doing small, real work on what it subscribes to.
//!
//! An engine is pure logic: it names the patterns it subscribes to and turns each incoming
//! message into outgoing messages. The runner in [`super`] holds its `Arc<dyn Bus>`,
//! subscribes, publishes and acks; engines never see a transport.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;

use busway::{Codec, Message, Overflow, Result, SubscribeOptions, Topic};
use serde::Serialize;

use super::messages::{
    FactorScore, Features, Margin, MlScore, Order, Position, Quote, Side, Trade,
};

/// One engine of the demo platform.
pub trait Engine: Send + fmt::Debug {
    /// Its name (`features`, `portfolio`...).
    fn name(&self) -> &'static str;
    /// Its service port, which doubles as its id.
    fn port(&self) -> u16;
    /// The patterns it subscribes to, with their options.
    fn subscriptions(&self) -> Vec<(&'static str, SubscribeOptions)>;
    /// Handles one incoming message, pushing what it publishes in response onto `out`.
    ///
    /// # Errors
    /// A payload that does not decode, or an output topic that is not valid; the runner
    /// counts the error and goes on with the next message.
    fn handle(&mut self, message: &Message, out: &mut Vec<Message>) -> Result<()>;
    /// One line on what it did, for the final table.
    fn summary(&self) -> String;
}

/// The engines, by name, with their ports, in pipeline order.
pub const ENGINES: [(&str, u16); 7] = [
    ("features", 8500),
    ("factor", 8300),
    ("ml", 8400),
    ("strategy", 8700),
    ("portfolio", 8900),
    ("collateral", 9000),
    ("websocket", 8600),
];

/// A fresh engine by name, or `None` for a name not in [`ENGINES`].
pub fn engine(name: &str) -> Option<Box<dyn Engine>> {
    Some(match name {
        "features" => Box::new(FeaturesEngine::default()),
        "factor" => Box::new(FactorEngine::default()),
        "ml" => Box::new(MlEngine::default()),
        "strategy" => Box::new(StrategyEngine::default()),
        "portfolio" => Box::new(PortfolioEngine::default()),
        "collateral" => Box::new(CollateralEngine::default()),
        "websocket" => Box::new(WebsocketEngine::default()),
        _ => return None,
    })
}

fn json<T: Serialize>(topic: String, value: &T) -> Result<Message> {
    Message::encode(Topic::new(topic)?, value, Codec::Json)
}

fn mean_std(xs: impl Iterator<Item = f64> + Clone) -> (f64, f64) {
    let n = xs.clone().count();
    if n == 0 {
        return (0.0, 0.0);
    }
    let mean = xs.clone().sum::<f64>() / n as f64;
    let var = xs.map(|x| (x - mean) * (x - mean)).sum::<f64>() / n as f64;
    (mean, var.sqrt())
}

/// Mids kept per symbol for the rolling statistics.
pub const WINDOW: usize = 20;

#[derive(Debug, Default)]
struct Window {
    mids: VecDeque<f64>,
    rets: VecDeque<f64>,
}

/// Features (8500): rolling mean and volatility per symbol from quotes.
#[derive(Debug, Default)]
pub struct FeaturesEngine {
    windows: BTreeMap<String, Window>,
    last_vol: BTreeMap<String, f64>,
}

impl Engine for FeaturesEngine {
    fn name(&self) -> &'static str {
        "features"
    }
    fn port(&self) -> u16 {
        8500
    }
    fn subscriptions(&self) -> Vec<(&'static str, SubscribeOptions)> {
        vec![("marketdata.quotes.*", SubscribeOptions::new())]
    }
    fn handle(&mut self, message: &Message, out: &mut Vec<Message>) -> Result<()> {
        let q: Quote = message.decode()?;
        let mid = (q.bid + q.ask) / 2.0;
        let w = self.windows.entry(q.sym.clone()).or_default();
        let mut ret = 0.0;
        if let Some(&prev) = w.mids.back() {
            if prev > 0.0 && mid > 0.0 {
                ret = (mid / prev).ln();
                w.rets.push_back(ret);
                if w.rets.len() > WINDOW {
                    w.rets.pop_front();
                }
            }
        }
        w.mids.push_back(mid);
        if w.mids.len() > WINDOW {
            w.mids.pop_front();
        }
        if w.mids.len() < 2 {
            return Ok(());
        }
        let (mean, std) = mean_std(w.mids.iter().copied());
        let (_, vol) = mean_std(w.rets.iter().copied());
        self.last_vol.insert(q.sym.clone(), vol);
        let f = Features {
            sym: q.sym,
            mid,
            mean,
            std,
            ret,
            vol,
            n: w.mids.len(),
        };
        out.push(json(format!("engine.features.{}", f.sym), &f)?);
        Ok(())
    }
    fn summary(&self) -> String {
        match self.last_vol.iter().max_by(|a, b| a.1.total_cmp(b.1)) {
            Some((sym, vol)) => format!(
                "{} symbols; most volatile {sym} ({:.3}%/tick)",
                self.windows.len(),
                vol * 100.0
            ),
            None => format!("{} symbols", self.windows.len()),
        }
    }
}

/// Factor (8300): a mean-reversion z-score from features.
#[derive(Debug, Default)]
pub struct FactorEngine {
    scores: BTreeMap<String, f64>,
}

impl Engine for FactorEngine {
    fn name(&self) -> &'static str {
        "factor"
    }
    fn port(&self) -> u16 {
        8300
    }
    fn subscriptions(&self) -> Vec<(&'static str, SubscribeOptions)> {
        vec![("engine.features.*", SubscribeOptions::new())]
    }
    fn handle(&mut self, message: &Message, out: &mut Vec<Message>) -> Result<()> {
        let f: Features = message.decode()?;
        let score = if f.std > 0.0 {
            (-(f.mid - f.mean) / f.std).clamp(-4.0, 4.0)
        } else {
            0.0
        };
        self.scores.insert(f.sym.clone(), score);
        let s = FactorScore { sym: f.sym, score };
        out.push(json(format!("engine.factor.{}", s.sym), &s)?);
        Ok(())
    }
    fn summary(&self) -> String {
        match self
            .scores
            .iter()
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
        {
            Some((sym, s)) => format!("{} symbols; strongest {sym} {s:+.2}", self.scores.len()),
            None => "no scores".to_string(),
        }
    }
}

/// ML (8400): a logistic model over the last return (in volatility units) and the distance
/// from the rolling mean.
#[derive(Debug, Default)]
pub struct MlEngine {
    p_up: BTreeMap<String, f64>,
}

/// The model's weights: intercept, momentum (return / vol), reversion (z-score).
const ML_WEIGHTS: [f64; 3] = [0.0, 0.9, -0.6];

impl Engine for MlEngine {
    fn name(&self) -> &'static str {
        "ml"
    }
    fn port(&self) -> u16 {
        8400
    }
    fn subscriptions(&self) -> Vec<(&'static str, SubscribeOptions)> {
        vec![("engine.features.*", SubscribeOptions::new())]
    }
    fn handle(&mut self, message: &Message, out: &mut Vec<Message>) -> Result<()> {
        let f: Features = message.decode()?;
        let momentum = if f.vol > 0.0 { f.ret / f.vol } else { 0.0 };
        let z = if f.std > 0.0 {
            (f.mid - f.mean) / f.std
        } else {
            0.0
        };
        let logit = ML_WEIGHTS[0] + ML_WEIGHTS[1] * momentum + ML_WEIGHTS[2] * z;
        let p_up = 1.0 / (1.0 + (-logit).exp());
        self.p_up.insert(f.sym.clone(), p_up);
        let s = MlScore { sym: f.sym, p_up };
        out.push(json(format!("engine.ml.{}", s.sym), &s)?);
        Ok(())
    }
    fn summary(&self) -> String {
        if self.p_up.is_empty() {
            return "no scores".to_string();
        }
        let mean = self.p_up.values().sum::<f64>() / self.p_up.len() as f64;
        format!("{} symbols; mean p(up) {mean:.2}", self.p_up.len())
    }
}

/// Shares per order.
const ORDER_QTY: u32 = 10;
/// The largest position the strategy builds, in shares either way.
const POSITION_LIMIT: i64 = 100;
/// Signals skipped per symbol after an order, so one move does not fire a burst.
const COOLDOWN: u32 = 10;

#[derive(Debug, Default)]
struct SymbolSignal {
    factor: Option<f64>,
    p_up: Option<f64>,
    cooldown: u32,
    target: i64,
}

/// Strategy (8700): combines the factor and ML scores into a signal and sends orders.
#[derive(Debug, Default)]
pub struct StrategyEngine {
    symbols: BTreeMap<String, SymbolSignal>,
    next_id: u64,
    buys: u64,
    sells: u64,
}

impl Engine for StrategyEngine {
    fn name(&self) -> &'static str {
        "strategy"
    }
    fn port(&self) -> u16 {
        8700
    }
    fn subscriptions(&self) -> Vec<(&'static str, SubscribeOptions)> {
        vec![
            ("engine.factor.*", SubscribeOptions::new()),
            ("engine.ml.*", SubscribeOptions::new()),
        ]
    }
    fn handle(&mut self, message: &Message, out: &mut Vec<Message>) -> Result<()> {
        let (sym, factor, p_up) = if message.topic.as_str().starts_with("engine.factor.") {
            let f: FactorScore = message.decode()?;
            (f.sym, Some(f.score), None)
        } else {
            let m: MlScore = message.decode()?;
            (m.sym, None, Some(m.p_up))
        };
        let s = self.symbols.entry(sym.clone()).or_default();
        s.factor = factor.or(s.factor);
        s.p_up = p_up.or(s.p_up);
        let (Some(factor), Some(p_up)) = (s.factor, s.p_up) else {
            return Ok(());
        };
        if s.cooldown > 0 {
            s.cooldown -= 1;
            return Ok(());
        }
        let signal = 0.5 * factor + 3.0 * (p_up - 0.5);
        let side = if signal > 1.0 && s.target < POSITION_LIMIT {
            Side::Buy
        } else if signal < -1.0 && s.target > -POSITION_LIMIT {
            Side::Sell
        } else {
            return Ok(());
        };
        s.cooldown = COOLDOWN;
        match side {
            Side::Buy => {
                s.target += i64::from(ORDER_QTY);
                self.buys += 1;
            }
            Side::Sell => {
                s.target -= i64::from(ORDER_QTY);
                self.sells += 1;
            }
        }
        self.next_id += 1;
        let order = Order {
            id: self.next_id,
            sym,
            side,
            qty: ORDER_QTY,
            signal,
        };
        out.push(json(format!("engine.orders.{}", order.sym), &order)?);
        Ok(())
    }
    fn summary(&self) -> String {
        format!(
            "{} orders ({} buy, {} sell)",
            self.buys + self.sells,
            self.buys,
            self.sells
        )
    }
}

#[derive(Debug, Default, Clone)]
struct Book {
    qty: i64,
    avg_px: f64,
    realized: f64,
}

impl Book {
    /// Applies a fill of `qty` signed shares at `px`: average cost on the way in, realized
    /// profit on the way out, a fresh average when the position flips.
    fn fill(&mut self, qty: i64, px: f64) {
        if self.qty == 0 || self.qty.signum() == qty.signum() {
            let total = self.qty.abs() + qty.abs();
            self.avg_px =
                (self.avg_px * self.qty.abs() as f64 + px * qty.abs() as f64) / total as f64;
            self.qty += qty;
            return;
        }
        let closing = qty.abs().min(self.qty.abs());
        self.realized += closing as f64 * (px - self.avg_px) * self.qty.signum() as f64;
        self.qty += qty;
        if self.qty == 0 {
            self.avg_px = 0.0;
        } else if self.qty.signum() == qty.signum() {
            self.avg_px = px;
        }
    }

    fn report(&self, sym: &str, last_px: f64) -> Position {
        Position {
            sym: sym.to_string(),
            qty: self.qty,
            avg_px: self.avg_px,
            last_px,
            realized: self.realized,
            unrealized: self.qty as f64 * (last_px - self.avg_px),
        }
    }
}

/// Portfolio (8900): fills orders at the last trade price and keeps positions and PnL.
/// Orders for a symbol that has not traded yet wait for its first trade.
#[derive(Debug, Default)]
pub struct PortfolioEngine {
    last: BTreeMap<String, f64>,
    pending: BTreeMap<String, Vec<Order>>,
    books: BTreeMap<String, Book>,
    fills: u64,
}

impl PortfolioEngine {
    fn execute(&mut self, order: &Order, px: f64) {
        let qty = i64::from(order.qty);
        let signed = match order.side {
            Side::Buy => qty,
            Side::Sell => -qty,
        };
        self.books
            .entry(order.sym.clone())
            .or_default()
            .fill(signed, px);
        self.fills += 1;
    }

    fn publish_position(&self, sym: &str, out: &mut Vec<Message>) -> Result<()> {
        if let (Some(book), Some(&px)) = (self.books.get(sym), self.last.get(sym)) {
            out.push(json(
                format!("engine.positions.{sym}"),
                &book.report(sym, px),
            )?);
        }
        Ok(())
    }
}

impl Engine for PortfolioEngine {
    fn name(&self) -> &'static str {
        "portfolio"
    }
    fn port(&self) -> u16 {
        8900
    }
    fn subscriptions(&self) -> Vec<(&'static str, SubscribeOptions)> {
        vec![
            ("marketdata.trades.*", SubscribeOptions::new()),
            ("engine.orders.*", SubscribeOptions::new()),
        ]
    }
    fn handle(&mut self, message: &Message, out: &mut Vec<Message>) -> Result<()> {
        if message.topic.as_str().starts_with("marketdata.trades.") {
            let t: Trade = message.decode()?;
            self.last.insert(t.sym.clone(), t.price);
            let waiting = self.pending.remove(&t.sym).unwrap_or_default();
            for order in &waiting {
                self.execute(order, t.price);
            }
            // Mark to market: every trade moves the PnL of an open position.
            if self.books.contains_key(&t.sym) {
                self.publish_position(&t.sym, out)?;
            }
        } else {
            let order: Order = message.decode()?;
            match self.last.get(&order.sym).copied() {
                Some(px) => {
                    self.execute(&order, px);
                    self.publish_position(&order.sym, out)?;
                }
                None => self
                    .pending
                    .entry(order.sym.clone())
                    .or_default()
                    .push(order),
            }
        }
        Ok(())
    }
    fn summary(&self) -> String {
        let pnl: f64 = self
            .books
            .iter()
            .map(|(sym, b)| {
                let px = self.last.get(sym).copied().unwrap_or(b.avg_px);
                b.realized + b.qty as f64 * (px - b.avg_px)
            })
            .sum();
        let open = self.books.values().filter(|b| b.qty != 0).count();
        format!("{} fills, {open} open positions, pnl {pnl:+.2}", self.fills)
    }
}

/// Initial margin on gross exposure.
const MARGIN_GROSS: f64 = 0.10;
/// Extra margin on the net (directional) exposure.
const MARGIN_NET: f64 = 0.05;

/// Collateral (9000): margin from all positions.
#[derive(Debug, Default)]
pub struct CollateralEngine {
    positions: BTreeMap<String, Position>,
    last: Option<Margin>,
}

impl Engine for CollateralEngine {
    fn name(&self) -> &'static str {
        "collateral"
    }
    fn port(&self) -> u16 {
        9000
    }
    fn subscriptions(&self) -> Vec<(&'static str, SubscribeOptions)> {
        vec![("engine.positions.*", SubscribeOptions::new())]
    }
    fn handle(&mut self, message: &Message, out: &mut Vec<Message>) -> Result<()> {
        let p: Position = message.decode()?;
        self.positions.insert(p.sym.clone(), p);
        let values = self.positions.values().map(|p| p.qty as f64 * p.last_px);
        let gross: f64 = values.clone().map(f64::abs).sum();
        let net: f64 = values.sum();
        let margin = Margin {
            gross,
            net,
            required: MARGIN_GROSS * gross + MARGIN_NET * net.abs(),
            pnl: self
                .positions
                .values()
                .map(|p| p.realized + p.unrealized)
                .sum(),
            symbols: self.positions.len(),
        };
        out.push(json("engine.margin".to_string(), &margin)?);
        self.last = Some(margin);
        Ok(())
    }
    fn summary(&self) -> String {
        match &self.last {
            Some(m) => format!(
                "gross {:.0}, margin {:.0}, pnl {:+.2}",
                m.gross, m.required, m.pnl
            ),
            None => "no positions".to_string(),
        }
    }
}

/// The simulated browser clients of the websocket engine: a name and the topic prefixes it
/// watches.
const WS_CLIENTS: [(&str, &[&str]); 3] = [
    ("ticker", &["marketdata."]),
    ("risk", &["engine.positions.", "engine.margin"]),
    (
        "blotter",
        &["engine.orders.", "engine.positions.", "marketdata.trades."],
    ),
];

/// Websocket (8600): fans out everything it subscribes to into pushes to its clients.
/// Market data comes with the `latest` overflow policy: a slow browser wants the newest
/// price, not a backlog.
#[derive(Debug, Default)]
pub struct WebsocketEngine {
    pushes: [u64; WS_CLIENTS.len()],
}

impl Engine for WebsocketEngine {
    fn name(&self) -> &'static str {
        "websocket"
    }
    fn port(&self) -> u16 {
        8600
    }
    fn subscriptions(&self) -> Vec<(&'static str, SubscribeOptions)> {
        vec![
            (
                "marketdata.>",
                SubscribeOptions::new()
                    .overflow(Overflow::Latest)
                    .capacity(256),
            ),
            ("engine.orders.*", SubscribeOptions::new()),
            ("engine.positions.*", SubscribeOptions::new()),
            ("engine.margin", SubscribeOptions::new()),
        ]
    }
    fn handle(&mut self, message: &Message, _out: &mut Vec<Message>) -> Result<()> {
        let topic = message.topic.as_str();
        for (i, (_, prefixes)) in WS_CLIENTS.iter().enumerate() {
            if prefixes.iter().any(|p| topic.starts_with(p)) {
                self.pushes[i] += 1;
            }
        }
        Ok(())
    }
    fn summary(&self) -> String {
        let total: u64 = self.pushes.iter().sum();
        let each: Vec<String> = WS_CLIENTS
            .iter()
            .zip(self.pushes)
            .map(|((name, _), n)| format!("{name} {n}"))
            .collect();
        format!("{total} client pushes ({})", each.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg<T: Serialize>(topic: &str, v: &T) -> Message {
        json(topic.to_string(), v).unwrap()
    }

    #[test]
    fn book_averages_in_and_realizes_out() {
        let mut b = Book::default();
        b.fill(10, 100.0);
        b.fill(10, 110.0);
        assert_eq!((b.qty, b.avg_px), (20, 105.0));
        b.fill(-30, 120.0);
        assert_eq!(b.qty, -10);
        assert!((b.realized - 300.0).abs() < 1e-9);
        assert_eq!(b.avg_px, 120.0);
        b.fill(10, 100.0);
        assert_eq!((b.qty, b.avg_px), (0, 0.0));
        assert!((b.realized - 500.0).abs() < 1e-9);
    }

    #[test]
    fn features_publish_rolling_stats_per_symbol() {
        let mut e = FeaturesEngine::default();
        let mut out = Vec::new();
        for (i, mid) in [100.0, 101.0, 102.0].into_iter().enumerate() {
            let q = Quote {
                sym: "AAPL".into(),
                bid: mid - 0.01,
                ask: mid + 0.01,
            };
            e.handle(&msg("marketdata.quotes.AAPL", &q), &mut out)
                .unwrap();
            assert_eq!(out.len(), i, "no features before two mids");
        }
        let f: Features = out[1].decode().unwrap();
        assert_eq!(out[1].topic.as_str(), "engine.features.AAPL");
        assert!((f.mean - 101.0).abs() < 1e-9);
        assert!(f.vol > 0.0 && f.ret > 0.0);
    }

    #[test]
    fn portfolio_waits_for_a_trade_then_fills_at_it() {
        let mut e = PortfolioEngine::default();
        let mut out = Vec::new();
        let order = Order {
            id: 1,
            sym: "MSFT".into(),
            side: Side::Buy,
            qty: 10,
            signal: 1.5,
        };
        e.handle(&msg("engine.orders.MSFT", &order), &mut out)
            .unwrap();
        assert!(out.is_empty());
        let t = Trade {
            sym: "MSFT".into(),
            price: 400.0,
            size: 5,
        };
        e.handle(&msg("marketdata.trades.MSFT", &t), &mut out)
            .unwrap();
        let p: Position = out[0].decode().unwrap();
        assert_eq!((p.qty, p.avg_px, p.last_px), (10, 400.0, 400.0));
    }

    #[test]
    fn collateral_margins_gross_and_net() {
        let mut e = CollateralEngine::default();
        let mut out = Vec::new();
        for (sym, qty) in [("A", 10), ("B", -10)] {
            let p = Position {
                sym: sym.into(),
                qty,
                avg_px: 100.0,
                last_px: 100.0,
                realized: 0.0,
                unrealized: 0.0,
            };
            e.handle(&msg(&format!("engine.positions.{sym}"), &p), &mut out)
                .unwrap();
        }
        let m: Margin = out[1].decode().unwrap();
        assert_eq!((m.gross, m.net, m.symbols), (2000.0, 0.0, 2));
        assert!((m.required - 200.0).abs() < 1e-9);
    }

    #[test]
    fn a_bad_payload_is_an_error_not_a_panic() {
        let mut e = FactorEngine::default();
        let bad = Message::try_new("engine.features.X", &b"not json"[..]).unwrap();
        assert!(e.handle(&bad, &mut Vec::new()).is_err());
    }

    #[test]
    fn every_listed_engine_exists() {
        for (name, port) in ENGINES {
            let e = engine(name).unwrap();
            assert_eq!((e.name(), e.port()), (name, port));
        }
        assert!(engine("risk").is_none());
    }
}
