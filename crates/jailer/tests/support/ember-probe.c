// SPDX-License-Identifier: Apache-2.0
//
// A stand-in for the VMM, run by the jailer in the integration tests. It is
// linked statically, so it runs in an empty jail, and reports what it sees
// from inside as `key=value` lines (the jail has no /proc, so everything is
// found with plain system calls).
//
// Options (after the ones the jailer adds):
//   --out <path>   write the report to <path> instead of stdout
//   --wait-stdin   after the report, block until stdin reaches EOF
//   /some/path     report whether that path exists
#include <dirent.h>
#include <fcntl.h>
#include <net/if.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

extern char **environ;

static int cmp(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static void report_dev(FILE *out, const char *path) {
    struct stat st;
    if (stat(path, &st) != 0) {
        fprintf(out, "dev %s missing\n", path);
        return;
    }
    fprintf(out, "dev %s chr=%d major=%u minor=%u mode=%o uid=%u gid=%u\n", path,
            S_ISCHR(st.st_mode) ? 1 : 0, major(st.st_rdev), minor(st.st_rdev),
            st.st_mode & 07777, st.st_uid, st.st_gid);
}

static void report_limit(FILE *out, const char *name, int res) {
    struct rlimit rl;
    getrlimit(res, &rl);
    fprintf(out, "rlimit_%s=%lld/%lld\n", name,
            rl.rlim_cur == RLIM_INFINITY ? -1LL : (long long)rl.rlim_cur,
            rl.rlim_max == RLIM_INFINITY ? -1LL : (long long)rl.rlim_max);
}

int main(int argc, char **argv) {
    FILE *out = stdout;
    int wait_stdin = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--out") == 0 && i + 1 < argc) {
            out = fopen(argv[++i], "w");
            if (!out)
                return 3;
        } else if (strcmp(argv[i], "--wait-stdin") == 0) {
            wait_stdin = 1;
        }
    }

    // Descriptors first, before this program opens any of its own.
    fprintf(out, "open_fds=");
    int any = 0;
    for (int fd = 3; fd < 1024; fd++) {
        if (out != stdout && fd == fileno(out))
            continue;
        if (fcntl(fd, F_GETFD) >= 0) {
            fprintf(out, "%s%d", any ? "," : "", fd);
            any = 1;
        }
    }
    fprintf(out, "%s\n", any ? "" : "none");

    fprintf(out, "argc=%d\n", argc);
    for (int i = 0; i < argc; i++)
        fprintf(out, "arg[%d]=%s\n", i, argv[i]);

    fprintf(out, "uid=%u gid=%u euid=%u egid=%u\n", getuid(), getgid(), geteuid(), getegid());
    fprintf(out, "groups=%d\n", getgroups(0, NULL));
    fprintf(out, "pid=%d ppid=%d sid=%d pgid=%d\n", getpid(), getppid(), getsid(0), getpgid(0));

    int envc = 0;
    for (char **e = environ; e && *e; e++)
        envc++;
    fprintf(out, "env_count=%d\n", envc);

    char cwd[4096];
    fprintf(out, "cwd=%s\n", getcwd(cwd, sizeof(cwd)) ? cwd : "?");

    char *names[256];
    int n = 0;
    DIR *d = opendir("/");
    if (d) {
        struct dirent *de;
        while ((de = readdir(d)) && n < 256) {
            if (strcmp(de->d_name, ".") && strcmp(de->d_name, ".."))
                names[n++] = strdup(de->d_name);
        }
        closedir(d);
    }
    qsort(names, n, sizeof(names[0]), cmp);
    fprintf(out, "root=");
    for (int i = 0; i < n; i++)
        fprintf(out, "%s%s", i ? " " : "", names[i]);
    fprintf(out, "\n");

    struct stat st;
    if (stat("/", &st) == 0)
        fprintf(out, "stat / mode=%o uid=%u gid=%u\n", st.st_mode & 07777, st.st_uid, st.st_gid);
    const char *dirs[] = {"/dev", "/dev/net", "/run"};
    for (int i = 0; i < 3; i++) {
        if (stat(dirs[i], &st) == 0)
            fprintf(out, "stat %s mode=%o uid=%u gid=%u\n", dirs[i], st.st_mode & 07777,
                    st.st_uid, st.st_gid);
        else
            fprintf(out, "stat %s missing\n", dirs[i]);
    }

    report_dev(out, "/dev/kvm");
    report_dev(out, "/dev/net/tun");
    report_dev(out, "/dev/urandom");
    report_dev(out, "/dev/userfaultfd");

    for (int i = 1; i < argc; i++) {
        if (argv[i][0] == '/' && (i == 0 || strcmp(argv[i - 1], "--out") != 0))
            fprintf(out, "exists %s=%d\n", argv[i], access(argv[i], F_OK) == 0);
    }

    for (int fd = 0; fd < 3; fd++) {
        if (fstat(fd, &st) != 0) {
            fprintf(out, "stdio %d closed\n", fd);
            continue;
        }
        const char *type = S_ISCHR(st.st_mode) ? "chr" : S_ISFIFO(st.st_mode) ? "fifo"
                           : S_ISREG(st.st_mode) ? "file" : S_ISSOCK(st.st_mode) ? "sock" : "other";
        fprintf(out, "stdio %d type=%s major=%u minor=%u\n", fd, type, major(st.st_rdev),
                minor(st.st_rdev));
    }

    report_limit(out, "nofile", RLIMIT_NOFILE);
    report_limit(out, "fsize", RLIMIT_FSIZE);

    struct if_nameindex *ifs = if_nameindex();
    fprintf(out, "ifaces=");
    for (struct if_nameindex *p = ifs; p && p->if_index; p++)
        fprintf(out, "%s%s", p == ifs ? "" : " ", p->if_name);
    fprintf(out, "\n");
    if (ifs)
        if_freenameindex(ifs);

    fprintf(out, "ready\n");
    fflush(out);
    if (out != stdout)
        fclose(out);

    if (wait_stdin) {
        char buf[64];
        while (read(0, buf, sizeof(buf)) > 0) {
        }
    }
    return 0;
}
