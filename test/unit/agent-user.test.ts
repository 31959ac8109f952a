// EXEC's user string (protocol version 3) resolved by the real agent on this
// host against a container rootfs's own /etc/passwd and /etc/group: squashfs
// layers made with mksquashfs, stacked by the agent under overlayfs in a
// private mount namespace. What a process ends up with is read from the
// kernel (/proc/self/status), not from the agent's reply.
import { strict as assert } from 'node:assert';
import { spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { AgentClient, AgentError } from '../../shim/agent/client';
import { MsgType, PayloadWriter } from '../../shim/agent/protocol';
import { buildTestLayers, rootfsPrerequisites, run, RunningAgent, startAgent } from './agent-harness';

const PASSWD = [
  'root:x:0:0:root:/root:/bin/sh',
  'daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin',
  'nginx:x:101:101:nginx:/var/cache/nginx:/sbin/nologin',
  'app:x:1000:1000::/home/app:/bin/sh',
  'nohome:x:1001:1001:::/bin/sh',
  'app:x:2000:2000:a second app entry: libc and runc take the first:/second:/bin/sh',
].join('\n') + '\n';
const GROUP = [
  'root:x:0:',
  'wheel:x:10:root,app',
  'staff:x:50:app',
  'nginx:x:101:',
  'app:x:1000:',
  'audio:x:29: nginx , app ',
  'wheel2:x:10:app',
].join('\n'); // no newline after the last line: libc reads it all the same

interface Creds { uid: number; gid: number; groups: number[]; home: string }

/** The process's real credentials as the kernel has them, and its HOME. */
async function credsOf(client: AgentClient, rootfs: string, user: string, env = ['PATH=/bin']): Promise<Creds> {
  const r = await run(client, ['sh', '-c', 'cat /proc/self/status; echo "HOME=$HOME"'], { rootfs, env, user });
  assert.deepEqual(r.status, { code: 0, signal: null }, r.stderr);
  const field = (name: string): string => {
    const m = new RegExp(`^${name}:[ \\t]*(.*)$`, 'm').exec(r.stdout);
    assert.ok(m, `${name} in ${r.stdout}`);
    return m[1].trim();
  };
  const uids = field('Uid').split(/\s+/).map(Number);
  const gids = field('Gid').split(/\s+/).map(Number);
  // real, effective, saved and filesystem ids all dropped, not only the effective one
  assert.equal(new Set(uids).size, 1, `Uid: ${uids}`);
  assert.equal(new Set(gids).size, 1, `Gid: ${gids}`);
  const groups = field('Groups') === '' ? [] : field('Groups').split(/\s+/).map(Number);
  const home = /^HOME=(.*)$/m.exec(r.stdout);
  assert.ok(home, r.stdout);
  return { uid: uids[0], gid: gids[0], groups: groups.sort((a, b) => a - b), home: home[1] };
}

function squashfs(dir: string, out: string): string {
  const r = spawnSync('mksquashfs', [dir, out, '-comp', 'zstd', '-noappend', '-quiet', '-no-progress'], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`mksquashfs ${dir}: ${r.stderr}`);
  return out;
}

/** A layer holding only what make() writes under its root. */
function layer(work: string, name: string, make: (root: string) => void): string {
  const root = join(work, name);
  mkdirSync(join(root, 'etc'), { recursive: true });
  make(root);
  return squashfs(root, join(work, `${name}.sqfs`));
}

async function expectAgentError(p: Promise<unknown>, code: string, message: RegExp): Promise<void> {
  await assert.rejects(p, (e: unknown) => {
    assert.ok(e instanceof AgentError, String(e));
    assert.equal(e.code, code, e.message);
    assert.match(e.message, message);
    return true;
  });
}

describe('agent: EXEC user names resolved in the rootfs (host-side, squashfs + overlay)', function () {
  // Building six squashfs layers (one of 33 MiB) takes a few seconds.
  this.timeout(60_000);
  let agent: RunningAgent;
  let client: AgentClient;
  let work: string;
  let layersWork: string;

  before(async function () {
    const missing = rootfsPrerequisites();
    if (missing) {
      console.log(`      !!! SKIPPED: user resolution needs root, loop devices, unshare, mksquashfs, busybox-static: ${missing}`);
      this.skip();
    }
    let busybox: string;
    ({ work: layersWork, layer1: busybox } = buildTestLayers());
    work = mkdtempSync(join(tmpdir(), 'vmlet-userdb-'));
    const db = layer(work, 'db', (root) => {
      writeFileSync(join(root, 'etc', 'passwd'), PASSWD);
      writeFileSync(join(root, 'etc', 'group'), GROUP);
    });
    const hostile = layer(work, 'hostile', (root) => {
      writeFileSync(join(root, 'etc', 'passwd'), [
        `${'h'.repeat(1 << 20)}:x:7:7::/huge:/bin/sh`, // 1 MiB line: skipped, never buffered whole
        'few:x:3', // too few fields
        'bad:x:abc:1::/:/bin/sh', // uid not a number
        'neg:x:-1:1::/:/bin/sh',
        'max:x:4294967295:1::/:/bin/sh', // (uid_t)-1
        ':x:5:5::/:/bin/sh', // empty name
        'nul\0:x:6:6::/:/bin/sh',
        '+nis::::::',
        '#late:x:1:1::/comment:/bin/sh',
        '',
        '   ',
        '\tlate:x:2000:2001:after the junk:/late:/bin/sh\r', // leading blank and CRLF, as libc tolerates
      ].join('\n') + '\n');
      writeFileSync(join(root, 'etc', 'group'), [
        `big:x:3000:${Array.from({ length: 40000 }, (_, i) => `member${i}`).join(',')},late`, // > 256 KiB: skipped
        'broken:x:notanumber:late',
        'twice:x:3001:late,late',
        'small:x:3002:nobody,late',
        'twice-again:x:3001:late', // same gid listed twice: one supplementary group
      ].join('\n') + '\n');
    });
    const symlinked = layer(work, 'symlinked', (root) => {
      mkdirSync(join(root, 'data'));
      writeFileSync(join(root, 'data', 'passwd'), 'inside:x:4000:4000::/inside:/bin/sh\n');
      // Absolute: resolved against the agent's root it would name the host's file.
      symlinkSync('/data/passwd', join(root, 'etc', 'passwd'));
      symlinkSync('/../../../../../../dev/zero', join(root, 'etc', 'group'));
    });
    const fifo = layer(work, 'fifo', (root) => {
      const r = spawnSync('mkfifo', [join(root, 'etc', 'passwd')]);
      assert.equal(r.status, 0);
    });
    const oversized = layer(work, 'oversized', (root) => {
      writeFileSync(join(root, 'etc', 'passwd'), 'filler:x:9:9::/:/bin/sh\n'.repeat(Math.ceil((33 << 20) / 24)));
    });
    agent = await startAgent({ mountNamespace: true });
    client = await agent.connect();
    await client.mountRootfs('u', [busybox, db]);
    await client.mountRootfs('nodb', [busybox]);
    await client.mountRootfs('hostile', [busybox, hostile]);
    await client.mountRootfs('symlinked', [busybox, symlinked]);
    await client.mountRootfs('fifo', [busybox, fifo]);
    await client.mountRootfs('oversized', [busybox, oversized]);
  });
  after(async () => {
    client?.close();
    await agent?.stop();
    for (const d of [work, layersWork]) if (d) rmSync(d, { recursive: true, force: true });
  });

  describe('every form of the user string, as runc resolves it', () => {
    const cases: [string, Creds][] = [
      // A name: ids and HOME from its first passwd entry, supplementary
      // groups from every group that lists it (audio's list has blanks).
      ['app', { uid: 1000, gid: 1000, groups: [10, 29, 50], home: '/home/app' }],
      // A uid with an entry is that entry: the same as its name.
      ['1000', { uid: 1000, gid: 1000, groups: [10, 29, 50], home: '/home/app' }],
      // An explicit group replaces the supplementary groups (runc, Docker).
      ['app:staff', { uid: 1000, gid: 50, groups: [], home: '/home/app' }],
      ['1000:50', { uid: 1000, gid: 50, groups: [], home: '/home/app' }],
      ['app:50', { uid: 1000, gid: 50, groups: [], home: '/home/app' }],
      ['1000:staff', { uid: 1000, gid: 50, groups: [], home: '/home/app' }],
      // A uid without an entry: gid 0 and HOME / (runc's defaults).
      ['4242', { uid: 4242, gid: 0, groups: [], home: '/' }],
      ['4242:nginx', { uid: 4242, gid: 101, groups: [], home: '/' }],
      ['4242:777', { uid: 4242, gid: 777, groups: [], home: '/' }],
      // Empty is Docker's default user: uid 0 as passwd describes it.
      ['', { uid: 0, gid: 0, groups: [10], home: '/root' }],
      ['root', { uid: 0, gid: 0, groups: [10], home: '/root' }],
      ['nginx', { uid: 101, gid: 101, groups: [29], home: '/var/cache/nginx' }],
      // "user:" is "user" in runc.
      ['nginx:', { uid: 101, gid: 101, groups: [29], home: '/var/cache/nginx' }],
      // An empty home field falls back to /.
      ['nohome', { uid: 1001, gid: 1001, groups: [], home: '/' }],
    ];
    for (const [user, want] of cases) {
      it(`'${user}' → uid ${want.uid}, gid ${want.gid}, groups [${want.groups}], HOME ${want.home}`, async () => {
        assert.deepEqual(await credsOf(client, 'u', user), want);
      });
    }

    it('a HOME in the request env wins over passwd', async () => {
      const c = await credsOf(client, 'u', 'app', ['PATH=/bin', 'HOME=/custom']);
      assert.equal(c.home, '/custom');
      assert.equal(c.uid, 1000);
    });

    it('the numeric fields without the user flag still mean what they did (no lookup, no HOME)', async () => {
      const r = await run(client, ['sh', '-c', 'id -u; id -g; echo "HOME=${HOME-unset}"'], { rootfs: 'u', env: ['PATH=/bin'], uid: 1000, gid: 7 });
      assert.equal(r.stdout, '1000\n7\nHOME=unset\n');
    });
  });

  describe('names that are not there', () => {
    it('an unknown user: UNKNOWN_USER naming the user and the file, nothing started, the agent keeps serving', async () => {
      await expectAgentError(client.exec({ args: ['sh', '-c', 'echo started > /started'], rootfs: 'u', user: 'ghost' }), 'UNKNOWN_USER',
        /user 'ghost' not found in \/etc\/passwd of rootfs 'u'/);
      const r = await run(client, ['sh', '-c', 'ls /started 2>&1 || echo none'], { rootfs: 'u', env: ['PATH=/bin'], user: 'app' });
      assert.match(r.stdout, /none/);
    });
    it('an unknown group: UNKNOWN_USER naming the group and /etc/group', () =>
      expectAgentError(client.exec({ args: ['true'], rootfs: 'u', user: 'app:ghosts' }), 'UNKNOWN_USER',
        /group 'ghosts' not found in \/etc\/group of rootfs 'u'/));
    it('a uid with an unknown group name: UNKNOWN_USER', () =>
      expectAgentError(client.exec({ args: ['true'], rootfs: 'u', user: '1000:ghosts' }), 'UNKNOWN_USER', /group 'ghosts'/));
    it('a rootfs without /etc/passwd: a name is UNKNOWN_USER saying the file does not exist', () =>
      expectAgentError(client.exec({ args: ['true'], rootfs: 'nodb', user: 'app' }), 'UNKNOWN_USER',
        /user 'app' not found in \/etc\/passwd of rootfs 'nodb' \(the file does not exist\)/));
    it('a rootfs without /etc/group: a group name is UNKNOWN_USER', () =>
      expectAgentError(client.exec({ args: ['true'], rootfs: 'nodb', user: '5:staff' }), 'UNKNOWN_USER',
        /group 'staff' not found in \/etc\/group of rootfs 'nodb' \(the file does not exist\)/));
    it('a rootfs without either file: numeric ids and the default user still run (gid 0, HOME /)', async () => {
      assert.deepEqual(await credsOf(client, 'nodb', '1234'), { uid: 1234, gid: 0, groups: [], home: '/' });
      assert.deepEqual(await credsOf(client, 'nodb', '1234:5'), { uid: 1234, gid: 5, groups: [], home: '/' });
      assert.deepEqual(await credsOf(client, 'nodb', ''), { uid: 0, gid: 0, groups: [], home: '/' });
    });
    it('names are looked up in the rootfs the process runs in, not the agent\'s root (the host has root, the rootfs does not)', () =>
      expectAgentError(client.exec({ args: ['true'], rootfs: 'nodb', user: 'root' }), 'UNKNOWN_USER', /rootfs 'nodb'/));
  });

  describe('hostile databases and user strings', () => {
    it('malformed, commented, NUL-holding and 1 MiB lines are skipped like libc does; the valid entry after them resolves', async () => {
      assert.deepEqual(await credsOf(client, 'hostile', 'late'), { uid: 2000, gid: 2001, groups: [3001, 3002], home: '/late' });
    });
    for (const name of ['few', 'bad', 'neg', 'max', 'nul', '+nis', '#late']) {
      it(`a name only on a skipped line ('${name}') is UNKNOWN_USER`, () =>
        expectAgentError(client.exec({ args: ['true'], rootfs: 'hostile', user: name }), 'UNKNOWN_USER', /not found in \/etc\/passwd/));
    }
    it('a group on a skipped line (gid not a number) is UNKNOWN_USER', () =>
      expectAgentError(client.exec({ args: ['true'], rootfs: 'hostile', user: 'late:broken' }), 'UNKNOWN_USER', /group 'broken'/));
    it('an absolute /etc/passwd symlink resolves inside the rootfs (RESOLVE_IN_ROOT), not on the host', async () => {
      // (Not busybox id: it would read this rootfs's /etc/group, which is /dev/zero.)
      assert.deepEqual(await credsOf(client, 'symlinked', 'inside:4001'), { uid: 4000, gid: 4001, groups: [], home: '/inside' });
    });
    it('/etc/group pointing at /dev/zero is refused as not a regular file instead of read forever', () =>
      expectAgentError(client.exec({ args: ['true'], rootfs: 'symlinked', user: 'inside' }), 'EXEC_FAILED',
        /opening \/etc\/group of rootfs 'symlinked': not a regular file/));
    it('a FIFO at /etc/passwd is refused, not waited on (the agent would block every connection)', async () => {
      await expectAgentError(client.exec({ args: ['true'], rootfs: 'fifo', user: 'x' }), 'EXEC_FAILED', /\/etc\/passwd of rootfs 'fifo': not a regular file/);
      await client.ping();
    });
    it('a /etc/passwd above 32 MiB is refused with its size limit', () =>
      expectAgentError(client.exec({ args: ['true'], rootfs: 'oversized', user: 'nobody-at-all' }), 'EXEC_FAILED', /larger than 32 MiB/));
    it('a user string above 256 bytes: BAD_REQUEST', () =>
      expectAgentError(client.exec({ args: ['true'], rootfs: 'u', user: 'a'.repeat(257) }), 'BAD_REQUEST', /257 bytes; at most 256/));
    it('more than one colon: BAD_REQUEST', () =>
      expectAgentError(client.exec({ args: ['true'], rootfs: 'u', user: 'a:b:c' }), 'BAD_REQUEST', /more than one ':'/));
    it('an id of 2^32-1 or above: BAD_REQUEST', async () => {
      await expectAgentError(client.exec({ args: ['true'], rootfs: 'u', user: '4294967295' }), 'BAD_REQUEST', /uid 4294967295 is not below/);
      await expectAgentError(client.exec({ args: ['true'], rootfs: 'u', user: '1:99999999999' }), 'BAD_REQUEST', /gid 99999999999/);
    });

    const execPayload = (flags: number, user: Buffer | null, uid = 0): Buffer => {
      const w = new PayloadWriter().u32(flags).strList(['true']).strList([]).str('').str('u').str('').u32(uid).u32(0).u32(0).u32(0).u16(0).u16(0);
      if (user) w.u32(user.length).raw(user);
      return w.build();
    };
    it('a NUL in the user string: INVALID_UTF8 naming the field', async () => {
      const r = await client.rawRequest(MsgType.Exec, execPayload(2, Buffer.from('app\0root')));
      assert.equal(r.error?.code, 'INVALID_UTF8');
      assert.match(r.error?.message ?? '', /'user'/);
    });
    it('the user flag with a uid too: BAD_REQUEST (the string decides the ids)', async () => {
      const r = await client.rawRequest(MsgType.Exec, execPayload(2, Buffer.from('app'), 5));
      assert.equal(r.error?.code, 'BAD_REQUEST');
      assert.match(r.error?.message ?? '', /send them as 0 and empty/);
    });
    it('the user flag without its field: BAD_FRAME', async () => {
      const r = await client.rawRequest(MsgType.Exec, execPayload(2, null));
      assert.equal(r.error?.code, 'BAD_FRAME');
      assert.match(r.error?.message ?? '', /'user'/);
    });
    it('the client refuses user together with uid', () =>
      assert.rejects(client.exec({ args: ['true'], user: 'app', uid: 3 }), /BAD_REQUEST: .*do not give them too/));
  });

  describe('versions', () => {
    it('a connection that agreed on version 2 gets what version 2 said of flag bit 1 (unknown), and keeps working', async () => {
      const c = await agent.connect();
      try {
        const hello = await c.rawRequest(MsgType.Hello, new PayloadWriter().u32(1).u32(2).str('v2-host').build());
        assert.equal(hello.type, MsgType.HelloOk);
        assert.equal(hello.payload.readUInt32LE(0), 2);
        const r = await c.rawRequest(MsgType.Exec, execPayloadV2());
        assert.equal(r.error?.code, 'BAD_REQUEST');
        assert.match(r.error?.message ?? '', /unknown bits set .*2 user needs version 3/);
        await c.ping();
      } finally {
        c.close();
      }
    });
    it('the client refuses a user string on a connection below version 3 before sending', async () => {
      const c = await agent.connect();
      try {
        c.hello = { ...c.hello!, version: 2 };
        await assert.rejects(c.exec({ args: ['true'], user: 'app' }), /UNSUPPORTED: exec user 'app' is resolved by the agent from protocol version 3/);
      } finally {
        c.close();
      }
    });
  });
});

function execPayloadV2(): Buffer {
  return new PayloadWriter().u32(2).strList(['true']).strList([]).str('').str('').str('').u32(0).u32(0).u32(0).u32(0).u16(0).u16(0).build();
}
