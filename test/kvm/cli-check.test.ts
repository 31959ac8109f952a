// `vmlet check` as a user runs it: a separate process, its exit status and
// its report. The guest's figures are checked by the command itself against
// the host's (CRCs, written bytes, vsock streams); here we pin that it says so,
// and that a host without a usable /dev/kvm gets a clear error, not a hang.
import { strict as assert } from 'node:assert';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { requireKvm } from '../helpers/kvm';
import { OciLayout, populateBusybox } from '../helpers/registry';

const cli = join(__dirname, '..', '..', 'shim', 'cli', 'vmlet.js');

function vmlet(args: string[], env: Record<string, string> = {}) {
  return spawnSync(process.execPath, [cli, ...args], { encoding: 'utf8', env: { ...process.env, ...env }, timeout: 180_000 });
}

describe('vmlet check', function () {
  let root: string;
  before(function () {
    requireKvm(this);
    root = mkdtempSync(join(tmpdir(), 'vmlet-check-root-'));
  });
  after(() => root && rmSync(root, { recursive: true, force: true }));

  it('boots the self-check guest and verifies virtio-blk and vsock byte for byte', () => {
    const r = vmlet(['--root', root, 'check', '--vsock-mib', '2']);
    assert.equal(r.status, 0, `${r.stdout}\n${r.stderr}`);
    for (const what of ['guest exit', 'virtio-blk scratch disk read', 'virtio-blk scratch disk write + flush',
      'virtio-vsock guest → host connection', 'virtio-vsock host → guest connection', 'guest summary']) {
      assert.match(r.stdout, new RegExp(`^ok +${what.replace(/[+]/g, '\\+')}: `, 'm'), what);
    }
    assert.match(r.stdout, /^ok +virtio-vsock guest → host connection: 2\.1 MB each way, byte-exact$/m);
    assert.doesNotMatch(r.stdout, /^FAIL/m);
    assert.match(r.stdout, /^vmlet check: all checks passed$/m);
  });

  it('--image attaches every layer read-only; the guest reads each whole (CRC = the host\'s) and cannot write it', async () => {
    const layout = await OciLayout.create(join(root, 'layout'));
    await layout.newImage('empty');
    await layout.addLayer('empty', 'base', populateBusybox);
    await layout.addLayer('base', 'two', (rootfs) => populateBusybox(join(rootfs, 'again')));
    const ref = 'localhost/check/busybox:two';
    const loaded = vmlet(['--root', root, 'load', '--name', ref, join(root, 'layout')]);
    assert.equal(loaded.status, 0, loaded.stderr);
    const r = vmlet(['--root', root, 'check', '--image', ref]);
    assert.equal(r.status, 0, `${r.stdout}\n${r.stderr}`);
    assert.match(r.stdout, /^ok +image layer 1\/2 \(read-only\): crc32 [0-9a-f]{8} of .*, write refused \(IOERR\)$/m);
    assert.match(r.stdout, /^ok +image layer 2\/2 \(read-only\): /m);
  });

  it('a missing KVM device is a KvmError that says what to do, exit 1', () => {
    const r = vmlet(['--root', root, 'check'], { VMLET_KVM_DEVICE: '/nonexistent/kvm' });
    assert.equal(r.status, 1, `${r.stdout}\n${r.stderr}`);
    assert.match(r.stderr, /vmlet check: KvmError: .*\/nonexistent\/kvm/);
    assert.match(r.stderr, /kvm-lab|kvm_intel|kvm_amd/, 'the message names a way out');
  });

  it('an image that is not in the store is an error naming it, exit 1', () => {
    const r = vmlet(['--root', root, 'check', '--image', 'localhost/nothing/here:v1']);
    assert.equal(r.status, 1, `${r.stdout}\n${r.stderr}`);
    assert.match(r.stderr, /localhost\/nothing\/here:v1/);
  });

  it('bad options are usage errors, exit 2', () => {
    const r = vmlet(['--root', root, 'check', '--vsock-mib', 'lots']);
    assert.equal(r.status, 2);
    assert.match(r.stderr, /--vsock-mib takes a whole number/);
  });
});
