// The host side of the test guest (native/ts/testguest.ts), without a VM.
import { strict as assert } from 'node:assert';
import { within } from '../../native/ts/testguest';

describe('testguest host side: within', () => {
  it('a stream that never opens fails with what was awaited, instead of hanging', async () => {
    const never = new Promise<number>(() => undefined);
    await assert.rejects(within(never, 30, "the guest's connection to the host"),
      /^Error: the guest's connection to the host: nothing after 30 ms$/);
  });

  it('a result that arrives in time is passed through, and its failure is kept', async () => {
    assert.equal(await within(Promise.resolve(7), 1000, 'x'), 7);
    await assert.rejects(within(Promise.reject(new Error('reset by peer')), 1000, 'x'), /reset by peer/);
  });
});
