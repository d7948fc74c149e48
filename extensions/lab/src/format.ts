/**
 * Money and time for people, exactly as the portal writes them.
 *
 * The portal's one rounding rule (gpuportal.provider.money.format_credits): two
 * decimals, rounded toward minus infinity, in integer arithmetic. Amounts arrive as
 * micro-credits; BigInt keeps the division exact where a float would round.
 * test/money-cases.json holds the edge cases that both sides are tested against.
 */

const CENT = BigInt(10_000); // micro-credits per hundredth of a credit

/** Micro-credits → "1.19", "-0.01": floor to the cent, like the portal. */
export function formatCredits(micro: number): string {
  if (!Number.isSafeInteger(micro)) {
    return '?';
  }
  const value = BigInt(micro);
  // BigInt division truncates toward zero; the rule is floor (toward minus infinity).
  let cents = value / CENT;
  if (value % CENT !== BigInt(0) && value < BigInt(0)) {
    cents -= BigInt(1);
  }
  const negative = cents < BigInt(0);
  const abs = negative ? -cents : cents;
  const whole = abs / BigInt(100);
  const part = (abs % BigInt(100)).toString().padStart(2, '0');
  return `${negative ? '-' : ''}${whole}.${part}`;
}

/** Seconds of runway → "3 h 12 min", "45 min", "under 1 min", "2 d 5 h" (rounded down). */
export function formatDuration(seconds: number): string {
  if (!Number.isFinite(seconds) || seconds < 60) {
    return 'under 1 min';
  }
  const minutes = Math.floor(seconds / 60);
  const days = Math.floor(minutes / 1440);
  const hours = Math.floor((minutes % 1440) / 60);
  const mins = minutes % 60;
  if (days > 0) {
    return hours > 0 ? `${days} d ${hours} h` : `${days} d`;
  }
  if (hours > 0) {
    return mins > 0 ? `${hours} h ${mins} min` : `${hours} h`;
  }
  return `${mins} min`;
}

/** Seconds until a moment, for a countdown: "1:05", "0:09"; never negative. */
export function formatCountdown(seconds: number): string {
  const s = Math.max(0, Math.ceil(seconds));
  return `${Math.floor(s / 60)}:${(s % 60).toString().padStart(2, '0')}`;
}
