import * as cases from './money-cases.json';
import { formatCountdown, formatCredits, formatDuration } from '../src/format';

describe('formatCredits', () => {
  it.each(cases.cases as [number, string][])('writes %p micro-credits as %p, like the portal', (micro, text) => {
    expect(formatCredits(micro)).toBe(text);
  });

  it('refuses what is not a whole number of micro-credits', () => {
    expect(formatCredits(1.5)).toBe('?');
    expect(formatCredits(Number.NaN)).toBe('?');
    expect(formatCredits(2 ** 60)).toBe('?');
  });
});

describe('formatDuration', () => {
  it.each([
    [0, 'under 1 min'],
    [59.9, 'under 1 min'],
    [60, '1 min'],
    [45 * 60 + 59, '45 min'],
    [3600, '1 h'],
    [3 * 3600 + 12 * 60 + 30, '3 h 12 min'],
    [86400, '1 d'],
    [2 * 86400 + 5 * 3600 + 59 * 60, '2 d 5 h'],
    [Number.POSITIVE_INFINITY, 'under 1 min']
  ])('%p seconds read %p', (seconds, text) => {
    expect(formatDuration(seconds)).toBe(text);
  });
});

describe('formatCountdown', () => {
  it.each([
    [65, '1:05'],
    [8.2, '0:09'],
    [-3, '0:00']
  ])('%p seconds count down as %p', (seconds, text) => {
    expect(formatCountdown(seconds)).toBe(text);
  });
});
