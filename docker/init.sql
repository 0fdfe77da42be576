-- The demo bank schema and a replication role for weir (docker-compose.yml).
CREATE ROLE weir LOGIN REPLICATION PASSWORD 'weir';
CREATE TABLE users (
  user_id serial PRIMARY KEY,
  name text NOT NULL,
  email text NOT NULL,
  registration_date date NOT NULL DEFAULT current_date
);
CREATE TABLE transactions (
  transaction_id bigserial PRIMARY KEY,
  user_id int NOT NULL REFERENCES users,
  transaction_date timestamptz NOT NULL,
  amount numeric(12,2) NOT NULL
);
ALTER TABLE users OWNER TO weir;
ALTER TABLE transactions OWNER TO weir;
GRANT CREATE ON DATABASE bank TO weir;
INSERT INTO users (name, email)
  SELECT 'user ' || i, 'user' || i || '@example.com' FROM generate_series(1, 20) i;
