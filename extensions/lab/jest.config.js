// Unit tests of the front end's pure logic (formatting, state, warning thresholds):
// ts-jest, as JupyterLab's extension template runs them, without a browser.
module.exports = {
  testEnvironment: 'node',
  transform: { '^.+\\.ts$': ['ts-jest', { tsconfig: 'tsconfig.test.json' }] },
  testMatch: ['<rootDir>/test/**/*.test.ts'],
};
