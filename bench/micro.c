/* Host-side micro benchmark: ns per call of the syscalls sandtrace must not slow down. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e9 + ts.tv_nsec;
}

int main(int argc, char **argv)
{
	const char *what = argv[1];
	long n = atol(argv[2]);
	struct sockaddr_in dst = { .sin_family = AF_INET, .sin_port = htons(9) };
	struct sockaddr_in any = { .sin_family = AF_INET };
	double t0, t1;

	dst.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	any.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	(void)argc;
	if (!strcmp(what, "getppid")) {
		t0 = now();
		for (long i = 0; i < n; i++)
			syscall(SYS_getppid);
		t1 = now();
	} else if (!strcmp(what, "connect")) {
		int s = socket(AF_INET, SOCK_DGRAM, 0);

		t0 = now();
		for (long i = 0; i < n; i++)
			connect(s, (struct sockaddr *)&dst, sizeof(dst));
		t1 = now();
	} else if (!strcmp(what, "bind")) {
		t0 = now();
		for (long i = 0; i < n; i++) {
			int s = socket(AF_INET, SOCK_DGRAM, 0);

			bind(s, (struct sockaddr *)&any, sizeof(any));
			close(s);
		}
		t1 = now();
	} else if (!strcmp(what, "sendto")) {
		/* unconnected UDP: each datagram names its destination */
		int s = socket(AF_INET, SOCK_DGRAM, 0);
		char byte = 0;

		t0 = now();
		for (long i = 0; i < n; i++)
			sendto(s, &byte, 1, 0, (struct sockaddr *)&dst, sizeof(dst));
		t1 = now();
	} else if (!strcmp(what, "tcp-pingpong")) {
		/* n request/response round trips of 64 bytes over one loopback TCP connection */
		struct sockaddr_in addr = any;
		socklen_t len = sizeof(addr);
		int l = socket(AF_INET, SOCK_STREAM, 0), c = socket(AF_INET, SOCK_STREAM, 0), a;
		char buf[64] = "GET / HTTP/1.1";

		bind(l, (struct sockaddr *)&addr, sizeof(addr));
		listen(l, 1);
		getsockname(l, (struct sockaddr *)&addr, &len);
		connect(c, (struct sockaddr *)&addr, sizeof(addr));
		a = accept(l, NULL, NULL);
		t0 = now();
		for (long i = 0; i < n; i++) {
			if (write(c, buf, sizeof(buf)) != sizeof(buf) ||
			    read(a, buf, sizeof(buf)) != sizeof(buf) ||
			    write(a, buf, sizeof(buf)) != sizeof(buf) ||
			    read(c, buf, sizeof(buf)) != sizeof(buf))
				return 1;
		}
		t1 = now();
	} else if (!strcmp(what, "socket")) {
		t0 = now();
		for (long i = 0; i < n; i++)
			close(socket(AF_INET, SOCK_DGRAM, 0));
		t1 = now();
	} else if (!strcmp(what, "unix-connect")) {
		/* a datagram unix socket (re)connecting to a bound one: an abstract name, so that
		 * nothing is left on disk */
		struct sockaddr_un un = { .sun_family = AF_UNIX };
		socklen_t len = offsetof(struct sockaddr_un, sun_path) + 1 +
				snprintf(un.sun_path + 1, sizeof(un.sun_path) - 1,
					 "sandtrace-bench-%d", getpid());
		int srv = socket(AF_UNIX, SOCK_DGRAM, 0);
		int s = socket(AF_UNIX, SOCK_DGRAM, 0);

		if (bind(srv, (struct sockaddr *)&un, len) != 0 ||
		    connect(s, (struct sockaddr *)&un, len) != 0) {
			perror("unix-connect");
			return 1;
		}
		t0 = now();
		for (long i = 0; i < n; i++)
			connect(s, (struct sockaddr *)&un, len);
		t1 = now();
	} else if (!strcmp(what, "connect-rate")) {
		/* n connects paced at argv[3] per second (busy-waiting between them) */
		int s = socket(AF_INET, SOCK_DGRAM, 0);
		double gap = 1e9 / atof(argv[3]);

		t0 = now();
		for (long i = 0; i < n; i++) {
			while (now() < t0 + i * gap)
				;
			connect(s, (struct sockaddr *)&dst, sizeof(dst));
		}
		t1 = now();
	} else if (!strcmp(what, "connect-every-ms")) {
		/* n connects, one per millisecond: the latency workload */
		int s = socket(AF_INET, SOCK_DGRAM, 0);
		struct timespec ms = { 0, 1000000 };

		t0 = now();
		for (long i = 0; i < n; i++) {
			connect(s, (struct sockaddr *)&dst, sizeof(dst));
			nanosleep(&ms, NULL);
		}
		t1 = now();
	} else if (!strcmp(what, "dns-answers")) {
		/* n copies of one DNS answer (www.example.test A 127.0.0.9, TTL 60) from
		 * argv[3]:53 to 127.0.0.1:argv[4]: what a sandboxed resolver client receives */
		static const unsigned char msg[] = {
			0x12, 0x34, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0,
			3, 'w', 'w', 'w', 7, 'e', 'x', 'a', 'm', 'p', 'l', 'e', 4, 't', 'e', 's', 't', 0,
			0, 1, 0, 1,
			0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 127, 0, 0, 9,
		};
		struct sockaddr_in from = { .sin_family = AF_INET, .sin_port = htons(53) };
		struct sockaddr_in to = { .sin_family = AF_INET };
		int s = socket(AF_INET, SOCK_DGRAM, 0), one = 1;

		inet_pton(AF_INET, argv[3], &from.sin_addr);
		to.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		to.sin_port = htons(atoi(argv[4]));
		setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		if (bind(s, (struct sockaddr *)&from, sizeof(from)) != 0) {
			perror("dns-answers");
			return 1;
		}
		t0 = now();
		for (long i = 0; i < n; i++)
			sendto(s, msg, sizeof(msg), 0, (struct sockaddr *)&to, sizeof(to));
		t1 = now();
	} else { /* fork+exec /bin/true */
		t0 = now();
		for (long i = 0; i < n; i++) {
			pid_t p = fork();

			if (p == 0) {
				execl("/bin/true", "true", (char *)NULL);
				_exit(127);
			}
			waitpid(p, NULL, 0);
		}
		t1 = now();
	}
	printf("%.1f\n", (t1 - t0) / n);
	return 0;
}
