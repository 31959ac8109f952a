// Gate for tests that need the raw /dev/kvm: without it they are SKIPPED,
// loudly, never counted as passed.
import { accessSync, constants } from 'node:fs';

export function kvmUnavailableReason(): string | null {
  try {
    accessSync('/dev/kvm', constants.R_OK | constants.W_OK);
    return null;
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    return code === 'ENOENT' ? '/dev/kvm is absent' : `/dev/kvm is not accessible (${code})`;
  }
}

/** Call in a `before` hook: skips the whole suite with a loud line when KVM is missing. */
export function requireKvm(ctx: Mocha.Context): void {
  const why = kvmUnavailableReason();
  if (why) {
    console.log(`      !!! SKIPPED (needs KVM): ${why}`);
    ctx.skip();
  }
}
