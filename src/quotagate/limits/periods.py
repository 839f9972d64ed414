"""Calendar periods of budgets, in UTC: where the period holding a moment starts and ends.

Integer arithmetic on Unix seconds, the same that the Redis script does in Lua, so both backends put
every moment in the same period. Weeks start on Monday; the Unix epoch (1970-01-01) was a Thursday.
"""

from __future__ import annotations

from quotagate.keys.models import Period

DAY = 86_400


def period_bounds(period: Period, now: float) -> tuple[int, int]:
    """The ``[start, end)`` Unix seconds of the UTC ``period`` that contains ``now``."""
    t = int(now // 1)
    if period == "minute":
        start = t - t % 60
        return start, start + 60
    if period == "hour":
        start = t - t % 3600
        return start, start + 3600
    days = t // DAY
    if period == "day":
        return days * DAY, (days + 1) * DAY
    if period == "week":
        monday = days - (days + 3) % 7
        return monday * DAY, (monday + 7) * DAY
    if period == "month":
        year, month, _ = civil_from_days(days)
        first = days_from_civil(year, month, 1)
        nxt = days_from_civil(year + month // 12, month % 12 + 1, 1)
        return first * DAY, nxt * DAY
    raise ValueError(f"unknown period {period!r}")


def civil_from_days(z: int) -> tuple[int, int, int]:
    """(year, month, day) of the proleptic Gregorian date ``z`` days after 1970-01-01 (H. Hinnant)."""
    z += 719_468
    era = (z if z >= 0 else z - 146_096) // 146_097
    doe = z - era * 146_097
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (1 if month <= 2 else 0), month, day


def days_from_civil(year: int, month: int, day: int) -> int:
    """Days from 1970-01-01 to the proleptic Gregorian date ``year-month-day`` (H. Hinnant)."""
    year -= 1 if month <= 2 else 0
    era = (year if year >= 0 else year - 399) // 400
    yoe = year - era * 400
    doy = (153 * (month - 3 if month > 2 else month + 9) + 2) // 5 + day - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146_097 + doe - 719_468
