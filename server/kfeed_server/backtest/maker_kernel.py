"""The compiled ``spread_maker``: resting limit orders and the queue model over snapshot and trade
columns, in a numba kernel (``backtest.fast`` runs it and builds the result).

It replays what the event engine replays for a TOUCH run without latency — the snapshots, with
the public trades of each instant before the snapshots of that instant — and gives exactly the
engine's result (tests/backtest/test_fast.py). The rule and the engine's rules it relies on:

* The strategy quotes a YES bid at the bid while the spread is at least ``min_spread`` and the
  position is under ``max_inventory``, and offers the position at the ask; when its wanted quotes
  change (or after any of its fills) it cancels both and places them again. It only ever holds
  YES, so no netting arises.
* A bid at the bid never crosses the ask (the spread is positive), so it rests whole. An offer
  at the ask takes the YES bid as a taker only on a locked or crossed snapshot; the rest rests.
* A resting order queues behind the size displayed at its price when placed (unknown when the
  level is below the top; none ahead above the top); at each snapshot of its market it fills
  whole when the other side bids through its price, else its queue shrinks by the configured
  share of cancellations; a trade at its price consumes the queue, then fills it; a trade
  through its price fills it whole. Maker fills pay maker fees (only in series that charge
  makers), a buy as much as the cash allows. A market's settlement cancels its orders.

Scalars live in one int64 array (``_S_*`` indices, the first 14 as ``fast._result`` reads them)
so that the helpers can update them. Per market, at most two orders rest (one bid, one offer):
``_SLOTS`` slots, in placement order by sequence number.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from kfeed_server.backtest.kernel_parts import kernel_fee, write_execution

# Scalars (``scalars``): the first 14 in ``fast._taker_kernel``'s order.
_S_CASH = 0
_S_MARKED = 1
_S_N_EX = 2
_S_N_CURVE = 3
_S_N_CLOSES = 4
_S_N_TRIPS = 5
_S_FEES = 6
_S_TRADES = 7
_S_REJECTED = 8
_S_PROCESSED = 9
_S_EXPOSED = 10
_S_FIRST = 11
_S_LAST = 12
_S_MAKER_FILLS = 14
_S_NOW = 15
_S_DAY_END = 16
_S_OPEN = 17
_S_OPEN_SINCE = 18
_S_NEXT_DUE = 19
_S_SEQUENCE = 20
_S_ERROR_ROW = 21  # a row whose order the engine refuses (limit price outside 1..9,999)
_S_ERROR_ORDER = 22  # 1: the bid, 2: the offer
_S_ERROR_COUNT = 23
MAKER_SCALARS = 24

_SLOTS = 2
# Slot fields (``slots[market, slot, field]``).
_R_ACTIVE = 0
_R_SEQUENCE = 1
_R_BUYING = 2
_R_PRICE = 3
_R_REMAINING = 4
_R_QUEUE_YES = 5
_R_QUEUE_PRICE = 6
_R_AHEAD = 7  # -1: not known yet
_R_LAST_SIZE = 8
_R_TRADED = 9
_R_FIELDS = 10

# Per-market fields (``m[market, field]``).
_M_HELD = 0  # YES held, 1/100 contract
_M_COST = 1
_M_MARK = 2
_M_TRIP = 3
_M_ROW = 4  # the latest snapshot's row (-1: none yet)
_M_BID = 5  # its YES bid (-1: none)
_M_SETTLED = 6
_M_QUOTED = 7  # 1 while the strategy's last quotes stand
_M_QUOTE_BID = 8
_M_QUOTE_ASK = 9
_M_FIELDS = 10

_DAY = 86_400_000_000
_UNKNOWN = -1


@njit(cache=True, boundscheck=True)
def _begin_event(st: np.ndarray, closes: np.ndarray, when: int) -> None:
    """The engine's ``begin_event``: day closes for the midnights ``when`` passes."""
    if st[_S_DAY_END] == _UNKNOWN:
        st[_S_FIRST] = when
        st[_S_DAY_END] = (when // _DAY + 1) * _DAY
    while when >= st[_S_DAY_END]:
        closes[st[_S_N_CLOSES]] = st[_S_CASH] + st[_S_MARKED]
        st[_S_N_CLOSES] += 1
        st[_S_DAY_END] += _DAY
    st[_S_LAST] = when


@njit(cache=True, boundscheck=True)
def _record_equity(st: np.ndarray, curve: np.ndarray, when: int) -> None:
    """One curve point per distinct time: the equity after the events at ``when``."""
    n = st[_S_N_CURVE]
    if n > 0 and curve[n - 1, 0] == when:
        curve[n - 1, 1] = st[_S_CASH] + st[_S_MARKED]
    else:
        curve[n, 0] = when
        curve[n, 1] = st[_S_CASH] + st[_S_MARKED]
        st[_S_N_CURVE] = n + 1


@njit(cache=True, boundscheck=True)
def _write(
    st: np.ndarray,
    ex: np.ndarray,
    when: int,
    market: int,
    snapshot_id: int,
    action: int,
    count: int,
    price: int,
    fee: int,
    position_after: int,
    realized: int,
) -> None:
    """One YES execution, in ``fast._result``'s columns."""
    st[_S_N_EX] = write_execution(ex, st[_S_N_EX], when, market, snapshot_id, action, count,
                                  price, fee, st[_S_CASH], position_after, realized, 1)  # fmt: skip


@njit(cache=True, boundscheck=True)
def _set_mark(st: np.ndarray, m: np.ndarray, c: int) -> None:
    """The position's value at the latest YES bid (nothing without a bid)."""
    bid = m[c, _M_BID]
    value = m[c, _M_HELD] * bid // 100 if bid >= 0 else 0
    st[_S_MARKED] += value - m[c, _M_MARK]
    m[c, _M_MARK] = value


@njit(cache=True, boundscheck=True)
def _close(st: np.ndarray, m: np.ndarray, trips: np.ndarray, c: int, when: int) -> None:
    """Ends the market's round trip."""
    trips[st[_S_N_TRIPS]] = m[c, _M_TRIP]
    st[_S_N_TRIPS] += 1
    st[_S_MARKED] -= m[c, _M_MARK]
    m[c, _M_TRIP] = 0
    m[c, _M_MARK] = 0
    m[c, _M_COST] = 0
    st[_S_OPEN] -= 1
    if st[_S_OPEN] == 0:
        st[_S_EXPOSED] += when - st[_S_OPEN_SINCE]
        st[_S_OPEN_SINCE] = _UNKNOWN


@njit(cache=True, boundscheck=True)
def _fill(
    st: np.ndarray,
    m: np.ndarray,
    ex: np.ndarray,
    trips: np.ndarray,
    c: int,
    buying: bool,
    count: int,
    gross: int,
    fee: int,
    price: int,
    snapshot_id: int,
    maker: bool,
) -> None:
    """The engine's ``_fill`` for a YES-only position; the strategy's ``on_fill`` (quote again)."""
    now = st[_S_NOW]
    realized = 0
    if buying:
        if m[c, _M_HELD] == 0:
            st[_S_OPEN] += 1
            if st[_S_OPEN_SINCE] == _UNKNOWN:
                st[_S_OPEN_SINCE] = now
        st[_S_CASH] -= gross + fee
        m[c, _M_HELD] += count
        m[c, _M_COST] += gross + fee
        _set_mark(st, m, c)
    else:
        released = m[c, _M_COST] * count // m[c, _M_HELD]
        realized = gross - fee - released
        st[_S_CASH] += gross - fee
        m[c, _M_COST] -= released
        m[c, _M_HELD] -= count
        m[c, _M_TRIP] += realized
        _set_mark(st, m, c)
        if m[c, _M_HELD] == 0:
            _close(st, m, trips, c, now)
    st[_S_FEES] += fee
    st[_S_TRADES] += 1
    if maker:
        st[_S_MAKER_FILLS] += 1
    action = 1 if buying else 2
    _write(st, ex, now, c, snapshot_id, action, count, price, fee, m[c, _M_HELD], realized)
    m[c, _M_QUOTED] = 0


@njit(cache=True, boundscheck=True)
def _maker_fill(
    st: np.ndarray,
    m: np.ndarray,
    slots: np.ndarray,
    ex: np.ndarray,
    trips: np.ndarray,
    sid: np.ndarray,
    c: int,
    slot: int,
    count: int,
    maker_rate: int,
    multiplier: int,
    flat: bool,
    charges_makers: bool,
    unit: int,
) -> None:
    """The engine's ``_maker_fill``: up to ``count`` at the order's price (a buy as much as the
    cash allows, a sale as much as is held); an order that cannot fill is removed."""
    r = slots[c, slot]
    price = r[_R_PRICE]
    buying = r[_R_BUYING] == 1
    rate = maker_rate if charges_makers else 0
    if buying:
        if (
            -(-count * price // 100) + kernel_fee(count, price, rate, multiplier, flat, unit)
            > st[_S_CASH]
        ):
            low = 0
            high = count
            while high - low > 1:
                middle = (low + high) // 2
                need = -(-middle * price // 100) + kernel_fee(
                    middle, price, rate, multiplier, flat, unit
                )
                if need <= st[_S_CASH]:
                    low = middle
                else:
                    high = middle
            count = low
    else:
        count = min(count, m[c, _M_HELD])
    fee = kernel_fee(count, price, rate, multiplier, flat, unit) if count > 0 else 0
    gross = -(-count * price // 100) if buying else count * price // 100
    if count <= 0 or (not buying and st[_S_CASH] + gross - fee < 0):
        r[_R_ACTIVE] = 0
        return
    _fill(st, m, ex, trips, c, buying, count, gross, fee, price, sid[m[c, _M_ROW]], True)
    r[_R_REMAINING] -= count
    if r[_R_REMAINING] <= 0:
        r[_R_ACTIVE] = 0


@njit(cache=True, boundscheck=True)
def _in_order(slots: np.ndarray, c: int) -> tuple[int, int]:
    """The market's active slots in placement order (-1: none)."""
    first, second = _UNKNOWN, _UNKNOWN
    for slot in range(_SLOTS):
        if slots[c, slot, _R_ACTIVE] == 1:
            if first == _UNKNOWN:
                first = slot
            elif slots[c, slot, _R_SEQUENCE] < slots[c, first, _R_SEQUENCE]:
                first, second = slot, first
            else:
                second = slot
    return first, second


@njit(cache=True, boundscheck=True)
def _queue_size(
    m: np.ndarray,
    c: int,
    queue_yes: bool,
    price: int,
    yes_bid: np.ndarray,
    no_bid: np.ndarray,
    yes_bid_size: np.ndarray,
    yes_ask_size: np.ndarray,
) -> int:
    """The size bid at ``price`` on one side in the latest snapshot: 0 above the top, unknown
    (-1) below it or when the size was not recorded."""
    row = m[c, _M_ROW]
    top = yes_bid[row] if queue_yes else no_bid[row]
    if top < 0 or top < price:
        return 0
    if top > price:
        return _UNKNOWN
    size: int = yes_bid_size[row] if queue_yes else yes_ask_size[row]
    return size


@njit(cache=True, boundscheck=True)
def _settle_due(
    st: np.ndarray,
    m: np.ndarray,
    slots: np.ndarray,
    ex: np.ndarray,
    curve: np.ndarray,
    closes: np.ndarray,
    trips: np.ndarray,
    until: int,
    due_time: np.ndarray,
    due_code: np.ndarray,
    due_payout: np.ndarray,
) -> None:
    """Settles the markets due at or before ``until`` (their orders are cancelled)."""
    while st[_S_NEXT_DUE] < due_time.size and due_time[st[_S_NEXT_DUE]] <= until:
        k = st[_S_NEXT_DUE]
        st[_S_NEXT_DUE] = k + 1
        when, c, payout = due_time[k], due_code[k], due_payout[k]
        m[c, _M_SETTLED] = 1
        for slot in range(_SLOTS):
            slots[c, slot, _R_ACTIVE] = 0
        held = m[c, _M_HELD]
        if held == 0:
            continue
        _begin_event(st, closes, when)
        amount = held * payout // 100
        st[_S_CASH] += amount
        realized = amount - m[c, _M_COST]
        m[c, _M_TRIP] += realized
        _write(st, ex, when, c, 0, 3, held, payout, 0, 0, realized)
        m[c, _M_HELD] = 0
        _close(st, m, trips, c, when)
        _record_equity(st, curve, when)


@njit(cache=True, boundscheck=True)
def maker_kernel(
    code: np.ndarray,
    time_us: np.ndarray,
    sid: np.ndarray,
    yes_bid: np.ndarray,
    yes_ask: np.ndarray,
    no_bid: np.ndarray,
    yes_bid_size: np.ndarray,
    yes_ask_size: np.ndarray,
    trade_code: np.ndarray,
    trade_time: np.ndarray,
    trade_yes_price: np.ndarray,
    trade_no_price: np.ndarray,
    trade_count: np.ndarray,
    trade_hits_yes: np.ndarray,
    min_spread: int,
    max_inventory: int,
    order_count: int,
    initial_cash: int,
    taker_rate: int,
    maker_rate: int,
    multipliers: np.ndarray,
    flats: np.ndarray,
    makers_pay: np.ndarray,
    unit: int,
    slippage: int,
    capped: bool,
    cancel_share: int,
    start_us: int,
    end_us: int,
    due_time: np.ndarray,
    due_code: np.ndarray,
    due_payout: np.ndarray,
    ex: np.ndarray,
    curve: np.ndarray,
    closes: np.ndarray,
    trips: np.ndarray,
    m: np.ndarray,
    scalars: np.ndarray,
) -> None:
    """Replays the snapshots with the trades (a trade before the first snapshot at or after its
    time, as the worker interleaves them) through the spread maker; fills the outputs. Stops at
    the first order the engine would refuse as malformed (``_S_ERROR_ROW``)."""
    st = scalars
    st[_S_CASH] = initial_cash
    st[_S_FIRST] = _UNKNOWN
    st[_S_LAST] = _UNKNOWN
    st[_S_DAY_END] = _UNKNOWN
    st[_S_OPEN_SINCE] = _UNKNOWN
    st[_S_NOW] = -(2**62)
    st[_S_ERROR_ROW] = _UNKNOWN
    markets = m.shape[0]
    slots = np.zeros((markets, _SLOTS, _R_FIELDS), dtype=np.int64)
    n_trades = trade_code.size
    j = 0
    for i in range(code.size + 1):
        limit = time_us[i] if i < code.size else 2**62
        # The trades at or before this row come first (the rest after the last row).
        while j < n_trades and (i == code.size or trade_time[j] <= limit):
            c = trade_code[j]
            t = trade_time[j]
            j += 1
            if c < 0 or t < start_us or t >= end_us:
                continue
            if st[_S_NEXT_DUE] < due_time.size and t >= due_time[st[_S_NEXT_DUE]]:
                _settle_due(st, m, slots, ex, curve, closes, trips, t, due_time, due_code,
                            due_payout)  # fmt: skip
            st[_S_NOW] = max(st[_S_NOW], t)
            hits_yes = trade_hits_yes[j - 1] == 1
            traded_at = trade_yes_price[j - 1] if hits_yes else trade_no_price[j - 1]
            count = trade_count[j - 1]
            for slot in _in_order(slots, c):
                if slot == _UNKNOWN:
                    continue
                r = slots[c, slot]
                if r[_R_ACTIVE] == 0 or (r[_R_QUEUE_YES] == 1) != hits_yes:
                    continue
                if traded_at < r[_R_QUEUE_PRICE]:
                    # Traded through the order's price: its level was used up first.
                    _maker_fill(st, m, slots, ex, trips, sid, c, slot, r[_R_REMAINING], maker_rate,
                                multipliers[c], flats[c], makers_pay[c], unit)  # fmt: skip
                elif traded_at == r[_R_QUEUE_PRICE]:
                    r[_R_TRADED] += count
                    if r[_R_AHEAD] == _UNKNOWN:
                        continue
                    used = min(r[_R_AHEAD], count)
                    r[_R_AHEAD] -= used
                    if count > used:
                        _maker_fill(st, m, slots, ex, trips, sid, c, slot,
                                    min(r[_R_REMAINING], count - used), maker_rate,
                                    multipliers[c], flats[c], makers_pay[c], unit)  # fmt: skip
        if i == code.size:
            break
        c = code[i]
        t = time_us[i]
        if c < 0 or t < start_us or t >= end_us:
            continue
        if st[_S_NEXT_DUE] < due_time.size and t >= due_time[st[_S_NEXT_DUE]]:
            _settle_due(st, m, slots, ex, curve, closes, trips, t, due_time, due_code, due_payout)
        if st[_S_DAY_END] == _UNKNOWN or t >= st[_S_DAY_END]:
            _begin_event(st, closes, t)
        m[c, _M_ROW] = i
        m[c, _M_BID] = yes_bid[i]
        st[_S_NOW] = t
        # Resting orders see the new snapshot: a price through them fills them, else the queue.
        for slot in _in_order(slots, c):
            if slot == _UNKNOWN:
                continue
            r = slots[c, slot]
            if r[_R_ACTIVE] == 0:
                continue
            queue_yes = r[_R_QUEUE_YES] == 1
            best = no_bid[i] if queue_yes else yes_bid[i]
            if best >= 0 and best >= 10_000 - r[_R_QUEUE_PRICE]:
                _maker_fill(st, m, slots, ex, trips, sid, c, slot, r[_R_REMAINING], maker_rate,
                            multipliers[c], flats[c], makers_pay[c], unit)  # fmt: skip
                continue
            size = _queue_size(m, c, queue_yes, r[_R_QUEUE_PRICE], yes_bid, no_bid,
                               yes_bid_size, yes_ask_size)  # fmt: skip
            if size == _UNKNOWN:
                continue
            if r[_R_AHEAD] == _UNKNOWN:
                r[_R_AHEAD] = size
            elif r[_R_LAST_SIZE] != _UNKNOWN:
                cancelled = max(0, r[_R_LAST_SIZE] - size - r[_R_TRADED])
                r[_R_AHEAD] = max(0, r[_R_AHEAD] - cancelled * cancel_share // 10_000)
            r[_R_AHEAD] = min(r[_R_AHEAD], size)
            r[_R_LAST_SIZE] = size
            r[_R_TRADED] = 0
        if m[c, _M_HELD] > 0:
            _set_mark(st, m, c)
        # The strategy: the quotes it wants; placed again (after a cancel) when they change.
        bid = yes_bid[i]
        ask = yes_ask[i]
        held = m[c, _M_HELD]
        wide = bid >= 0 and ask >= 0 and ask - bid >= min_spread
        want_bid = bid if wide and held < max_inventory else _UNKNOWN
        want_ask = ask if held > 0 and ask >= 0 else _UNKNOWN
        if not (m[c, _M_QUOTED] == 1 and m[c, _M_QUOTE_BID] == want_bid
                and m[c, _M_QUOTE_ASK] == want_ask):  # fmt: skip
            m[c, _M_QUOTED] = 1
            m[c, _M_QUOTE_BID] = want_bid
            m[c, _M_QUOTE_ASK] = want_ask
            for slot in range(_SLOTS):
                slots[c, slot, _R_ACTIVE] = 0
            for order in range(2):
                buying = order == 0
                price = want_bid if buying else want_ask
                if price == _UNKNOWN:
                    continue
                count = min(order_count, max_inventory - held) if buying else held
                if not 0 < price < 10_000:
                    st[_S_ERROR_ROW] = i
                    st[_S_ERROR_ORDER] = order + 1
                    st[_S_ERROR_COUNT] = count
                    return
                if m[c, _M_SETTLED] == 1:
                    st[_S_REJECTED] += 1
                    continue
                filled = 0
                if not buying and bid >= price:
                    # A locked or crossed snapshot: the offer takes the YES bid first.
                    size = yes_bid_size[i]
                    n = min(count, m[c, _M_HELD])
                    if capped and size >= 0:
                        n = min(n, size)
                    if n > 0:
                        paid = max(bid - slippage, 0)
                        fee = kernel_fee(n, bid, taker_rate, multipliers[c], flats[c], unit)
                        gross = n * paid // 100
                        if st[_S_CASH] + gross - fee >= 0:
                            _fill(st, m, ex, trips, c, False, n, gross, fee, paid, sid[i], False)
                            filled = n
                # (A bid at the bid never crosses: the ask is above it.)
                remaining = count - filled
                if remaining <= 0:
                    continue
                if not buying and m[c, _M_HELD] <= 0:
                    if filled == 0:
                        st[_S_REJECTED] += 1
                    continue
                slot = 0 if slots[c, 0, _R_ACTIVE] == 0 else 1
                r = slots[c, slot]
                st[_S_SEQUENCE] += 1
                r[_R_ACTIVE] = 1
                r[_R_SEQUENCE] = st[_S_SEQUENCE]
                r[_R_BUYING] = 1 if buying else 0
                r[_R_PRICE] = price
                r[_R_REMAINING] = remaining
                # A bid queues on the YES bids at its price, an offer on the NO bids at 1 − it.
                r[_R_QUEUE_YES] = 1 if buying else 0
                r[_R_QUEUE_PRICE] = price if buying else 10_000 - price
                ahead = _queue_size(m, c, buying, r[_R_QUEUE_PRICE], yes_bid, no_bid,
                                    yes_bid_size, yes_ask_size)  # fmt: skip
                r[_R_AHEAD] = ahead
                r[_R_LAST_SIZE] = ahead
                r[_R_TRADED] = 0
        _record_equity(st, curve, t)
        st[_S_PROCESSED] += 1
    # finish(): the settlements left inside the window, then the open position's exposure.
    if st[_S_FIRST] != _UNKNOWN:
        st[_S_LAST] = max(st[_S_LAST], st[_S_NOW])
    _settle_due(st, m, slots, ex, curve, closes, trips, 2**62, due_time, due_code, due_payout)
    if st[_S_FIRST] != _UNKNOWN:
        if st[_S_OPEN_SINCE] != _UNKNOWN:
            st[_S_EXPOSED] += st[_S_LAST] - st[_S_OPEN_SINCE]
        closes[st[_S_N_CLOSES]] = st[_S_CASH] + st[_S_MARKED]
        st[_S_N_CLOSES] += 1


# What ``backtest.fast`` reads and allocates.
MARKET_FIELDS = _M_FIELDS
MARKET_ROW = _M_ROW
MARKET_HELD = _M_HELD
MARKET_COST = _M_COST
MARKET_MARK = _M_MARK
ERROR_ROW = _S_ERROR_ROW
ERROR_ORDER = _S_ERROR_ORDER
ERROR_COUNT = _S_ERROR_COUNT
