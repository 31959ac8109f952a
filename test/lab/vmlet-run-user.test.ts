// `vmlet run -u NAME` and an image's User name, end to end inside hack/kvm-lab:
// the real CLI boots our guest and the agent resolves the names in the
// container's own /etc/passwd and /etc/group (the overlay it stacked in the
// guest). One microVM per `it`.
import { strict as assert } from 'node:assert';
import { rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { CliResult, vmletRunLabFixture, runCli, writeOciLayout } from '../helpers/vmlet-cli';

function show(r: CliResult): string {
  return `exit ${r.code ?? r.signal}\n--- stdout\n${r.stdout.toString()}\n--- stderr\n${r.stderr.toString()}`;
}

// The process reports what the kernel gave it and its HOME.
const REPORT = 'echo "uid=$(id -u) gid=$(id -g) groups=$(id -G) home=$HOME"';

describe('vmlet run -u with user and group names (inside hack/kvm-lab)', function () {
  this.timeout(180_000);
  let work: string;
  let rootDir: string;

  before(function () {
    ({ work, rootDir } = vmletRunLabFixture(this, 'vmlet-run-user-'));
    writeFileSync(join(rootDir, 'etc', 'passwd'), 'root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n');
    writeFileSync(join(rootDir, 'etc', 'group'), 'root:x:0:\nwheel:x:10:app\nstaff:x:50:app\napp:x:1000:\n');
  });
  after(() => {
    if (work) rmSync(work, { recursive: true, force: true });
  });

  it('-u NAME: uid, gid, supplementary groups and HOME from the rootfs\'s passwd and group', async function () {
    if (!rootDir) this.skip();
    const r = await runCli(['run', '-u', 'app', rootDir, '--', 'sh', '-c', REPORT]);
    assert.equal(r.code, 0, show(r));
    assert.equal(r.stdout.toString(), 'uid=1000 gid=1000 groups=1000 10 50 home=/home/app\n');
  });

  it('an image\'s User "app:staff": the named group, no supplementary groups', async function () {
    if (!rootDir) this.skip();
    const root = join(work, 'store');
    writeOciLayout(join(work, 'layout'), rootDir, 'v1', { Entrypoint: ['/bin/sh', '-c'], Cmd: [REPORT], User: 'app:staff' });
    const load = await runCli(['--root', root, 'load', '--name', 'localhost/run-user/busybox:v1', join(work, 'layout')]);
    assert.equal(load.code, 0, show(load));
    const r = await runCli(['--root', root, 'run', 'localhost/run-user/busybox:v1']);
    assert.equal(r.code, 0, show(r));
    assert.equal(r.stdout.toString(), 'uid=1000 gid=50 groups=50 home=/home/app\n');
  });

  it('-u with a name the image does not define: exit 125 naming the user and the file, nothing runs', async function () {
    if (!rootDir) this.skip();
    const r = await runCli(['run', '-u', 'ghost', rootDir, '--', 'sh', '-c', 'echo ran']);
    assert.equal(r.code, 125, show(r));
    assert.equal(r.stdout.toString(), '');
    assert.match(r.stderr.toString(), /UNKNOWN_USER: EXEC "sh": user 'ghost' not found in \/etc\/passwd of rootfs '[^']+'/, show(r));
  });
});
